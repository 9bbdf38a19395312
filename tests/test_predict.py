"""tlkeras.predict / load_run: one trained model, predicted from memory, run folder and exports."""

import csv
import io
import os

import keras
import numpy as np
import pytest
from PIL import Image

import tlkeras
from tlkeras import cli
from tlkeras.predict import Predictor

RED, BLUE = (220, 30, 30), (30, 30, 220)


def _colour_images(rng, colour, n, size):
    noise = rng.integers(-25, 26, (n, *size, 3))
    return np.clip(np.array(colour) + noise, 0, 255).astype("float32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model told red from blue by fine_tune (run folder), exported in every format,
    and a folder of new images of another size, with one corrupt file."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x = np.concatenate([_colour_images(rng, RED, 16, (16, 16)),
                        _colour_images(rng, BLUE, 16, (16, 16))])
    y = np.array([1] * 16 + [0] * 16)  # classes in folder order: blue, red
    base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
                             keras.layers.Conv2D(4, 3, activation="relu")], name="tiny")
    model = tlkeras.build_transfer_model(base, 2, input_shape=(16, 16, 3), dropout=0)
    train = tlkeras.data.from_arrays(x, y, batch_size=8, seed=0)
    tlkeras.fine_tune(model, train, head_epochs=15, fine_tune_epochs=0, learning_rate=0.05,
                      log_dir=str(root / "run"), class_names=["blue", "red"], verbose=0)
    tlkeras.export_model(model, root / "export", class_names=["blue", "red"])
    for colour, name in [(RED, "red"), (BLUE, "blue")]:
        os.makedirs(root / "new" / name)
        for i, image in enumerate(_colour_images(rng, colour, 2, (20, 24))):
            Image.fromarray(image.astype("uint8")).save(root / "new" / name / f"{i}.png")
    (root / "new" / "blue" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root, model


def test_every_model_kind_gives_the_same_top_classes(trained):
    root, model = trained
    run = tlkeras.load_run(root / "run")
    assert run.class_names == ["blue", "red"] and run.config["head_epochs"] == 15
    assert len(run.history["loss"]) == 15 and run.history["loss"][-1] < run.history["loss"][0]

    reference = tlkeras.predict(model, str(root / "new"), top_k=2, class_names=run.class_names)
    assert [os.path.basename(os.path.dirname(p)) for p in reference.inputs] == reference.labels
    assert len(reference.inputs) == 4 and reference.input_kind == "file"
    assert [os.path.basename(p) for p, _ in reference.skipped] == ["broken.png"]
    pixels = [np.asarray(Image.open(p), "float32") for p in reference.inputs]
    by_hand = model.predict(keras.ops.image.resize(np.stack(pixels), (16, 16)), verbose=0)
    np.testing.assert_allclose(reference.probabilities, by_hand, atol=1e-5)

    sources = [run, root / "run", root / "run" / "model.keras", root / "export",
               root / "export" / "saved_model", root / "export" / "model.tflite"]
    for source in sources:
        result = tlkeras.predict(source, str(root / "new"), top_k=1)
        assert result.class_names == ["blue", "red"], source  # from the run or labels.txt
        assert result.inputs == reference.inputs and result.labels == reference.labels, source
        np.testing.assert_allclose(result.probabilities, reference.probabilities, atol=1e-4)
        assert result.top_k.shape == (4, 1)

    images = np.stack(pixels)  # arrays at another size are resized to the model's
    from_arrays = tlkeras.predict(root / "export" / "model.tflite", images, top_k=2)
    np.testing.assert_allclose(from_arrays.probabilities, reference.probabilities, atol=1e-4)
    rows = from_arrays.to_rows()
    assert rows[0]["index"] == 0 and rows[0]["label_1"] == reference.labels[0]
    table = list(csv.DictReader(io.StringIO(reference.to_csv())))
    assert [r["file"] for r in table] == reference.inputs
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) for r in table)


def test_cli_predict_reads_exports_and_fails_clearly(trained, capsys):
    root, _ = trained
    for model in ["export/model.tflite", "export/saved_model", "run"]:
        output = root / f"{model.replace('/', '_')}.csv"
        assert cli.main(["predict", "--model", str(root / model), str(root / "new"),
                         "--top_k", "1", "--output", str(output)]) == 0
        rows = list(csv.DictReader(output.open()))
        assert [r["label_1"] for r in rows] == [
            os.path.basename(os.path.dirname(r["file"])) for r in rows]
    assert "skipping" in capsys.readouterr().err
    labels = root / "three.txt"
    labels.write_text("a\nb\nc\n")
    assert cli.main(["predict", "--model", str(root / "run"), "--labels", str(labels),
                     str(root / "new")]) == 2
    assert "3 class names" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no model.keras, saved_model.pb"):
        Predictor(str(root / "new"))
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        tlkeras.predict(root / "run", np.zeros((2, 5)))


def test_tta_averages_the_flipped_views_for_every_model_kind(trained, capsys):
    root, model = trained
    rng = np.random.default_rng(1)
    images = np.concatenate([_colour_images(rng, RED, 3, (16, 16)),
                             _colour_images(rng, BLUE, 3, (16, 16))])
    views = [images, images[:, :, ::-1]]  # the image and its horizontal mirror
    expected = np.mean([model.predict(v, verbose=0) for v in views], axis=0)
    plain = tlkeras.predict(model, images).probabilities
    assert np.abs(plain - expected).max() > 1e-7  # the flipped view really counts
    np.testing.assert_allclose(tlkeras.tta.tta_model(model).predict(images, verbose=0), expected,
                               rtol=1e-5, atol=1e-6)
    for source in [model, root / "run", root / "run" / "model.keras",
                   root / "export" / "model.tflite"]:
        result = tlkeras.predict(source, images, top_k=1, tta=True)
        np.testing.assert_allclose(result.probabilities, expected, atol=1e-5, err_msg=str(source))
    output = root / "tta.csv"
    assert cli.main(["predict", "--model", str(root / "run"), str(root / "new"), "--tta",
                     "--top_k", "1", "--output", str(output)]) == 0
    rows = list(csv.DictReader(output.open()))
    by_api = tlkeras.predict(root / "run", str(root / "new"), top_k=1, tta=True)
    assert [float(r["probability_1"]) for r in rows] == pytest.approx(
        by_api.probabilities.max(-1), abs=1e-6)
