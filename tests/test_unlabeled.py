"""tlkeras.unlabeled: SimCLR pretraining, CORAL/DANN adaptation, clustering and retrieval."""

import json
import logging
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkeras
from tlkeras.demo import small_cnn
from tlkeras.unlabeled import GradientReversal, NeighborIndex, covariance_gap, simclr_augmentation

from conftest import digits_rgb


@pytest.fixture(scope="module")
def digits_base(tmp_path_factory):
    """The demo's small CNN, pretrained on clean digits 0-4 for a few epochs, saved."""
    x, y = digits_rgb(16, classes=[0, 1, 2, 3, 4])
    keras.utils.set_random_seed(0)
    base = small_cnn()
    model = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(5, activation="softmax")])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    path = str(tmp_path_factory.mktemp("base") / "digits_base.keras")
    base.save(path)
    return path


def _view_gap(encoder, images, augmentation):
    """Mean cosine similarity of two views of one image minus that of views of different images."""
    a = keras.ops.normalize(encoder(augmentation(images, training=True)), axis=-1).numpy()
    b = keras.ops.normalize(encoder(augmentation(images, training=True)), axis=-1).numpy()
    sims = a @ b.T
    n = len(sims)
    return float(np.trace(sims) / n - (sims.sum() - np.trace(sims)) / (n * n - n))


def test_pretrain_adapts_base_and_transfer_model_in_place(tmp_path):
    x, _ = digits_rgb(16)
    keras.utils.set_random_seed(0)
    base = small_cnn()
    encoder = keras.Sequential([base, keras.layers.GlobalAveragePooling2D()])
    probe = x[:64]
    augmentation = simclr_augmentation((16, 16, 3), seed=3)
    before_gap = _view_gap(encoder, probe, augmentation)
    before = [w.copy() for w in base.get_weights()]
    def layout_of(model):
        return [(layer.name, [tuple(w.shape) for w in layer.weights]) for layer in model.layers]

    layout = layout_of(base)
    trainable = [layer.trainable for layer in base._flatten_layers()]

    result = tlkeras.pretrain(base, x[:256], epochs=3, batch_size=64, run_dir=tmp_path / "run",
                              seed=0, verbose=0)

    assert result.model is base
    assert layout_of(base) == layout
    assert base.input_shape == (None, 16, 16, 3) and base.output_shape == (None, 4, 4, 32)
    assert not any("projection" in layer.name for layer in base._flatten_layers())
    assert [layer.trainable for layer in base._flatten_layers()] == trainable
    changed = [not np.allclose(a, b) for a, b in zip(before, base.get_weights())]
    assert any(changed)
    # Two views of one image now sit closer, relative to views of other images, than before.
    augmentation = simclr_augmentation((16, 16, 3), seed=3)
    after_gap = _view_gap(encoder, probe, augmentation)
    assert after_gap > before_gap and after_gap > 0
    assert result.history["loss"][-1] < result.history["loss"][0]
    # The run folder: history, TensorBoard logs and the adapted base, loadable in safe mode.
    assert os.path.isfile(result.paths["history.csv"]) and os.path.isdir(result.paths["logs"])
    loaded = keras.saving.load_model(result.paths["model.keras"])
    np.testing.assert_allclose(loaded.predict(probe, verbose=0), base.predict(probe, verbose=0),
                               atol=1e-5)
    # Started again on the finished run folder, it resumes: nothing to train, the weights restored.
    again = tlkeras.pretrain(small_cnn(), x[:256], epochs=3, batch_size=64,
                             run_dir=tmp_path / "run", verbose=0)
    assert again.history == {}
    for a, b in zip(again.model.get_weights(), base.get_weights()):
        np.testing.assert_allclose(a, b)

    # A transfer model: its base adapts, its head and input contract stay.
    model = tlkeras.build_transfer_model(small_cnn(), 3, weights=None)
    head = model.get_layer("predictions").get_weights()
    base_before = [w.copy() for w in tlkeras.get_base(model).get_weights()]
    out = tlkeras.pretrain(model, x[:128], epochs=1, batch_size=64, verbose=0)
    assert out.model is model and model.output_shape == (None, 3)
    assert [layer.name for layer in model.layers] == [layer.name for layer in out.model.layers]
    for a, b in zip(head, model.get_layer("predictions").get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b)
               for a, b in zip(base_before, tlkeras.get_base(model).get_weights()))
    assert not tlkeras.get_base(model).trainable  # the frozen base stays frozen

    with pytest.raises(ValueError, match="method='simclr'"):
        tlkeras.pretrain(base, x[:8], method="byol")


def test_pretrain_mixed_precision_and_strategy():
    x, _ = digits_rgb(16)
    keras.utils.set_random_seed(0)
    policy = keras.mixed_precision.global_policy().name
    # Mixed precision: a transfer model (float32) trains through a mixed_float16 copy.
    model = tlkeras.build_transfer_model(small_cnn(), 3, weights=None)
    before = [w.copy() for w in tlkeras.get_base(model).get_weights()]
    result = tlkeras.pretrain(model, x[:64], epochs=1, batch_size=32, precision="mixed_float16",
                              seed=0, verbose=0)
    assert result.model is model
    assert np.all(np.isfinite(result.history["loss"]))
    assert any(not np.allclose(a, b)
               for a, b in zip(before, tlkeras.get_base(model).get_weights()))
    assert all(w.dtype == "float32" for w in model.weights)
    assert keras.mixed_precision.global_policy().name == policy
    # A distribution strategy: a plain base, trained in the strategy's scope.
    base = small_cnn()
    before = [w.copy() for w in base.get_weights()]
    result = tlkeras.pretrain(base, x[:64], epochs=1, batch_size=32, seed=0, verbose=0,
                              strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))
    assert result.model is base and np.all(np.isfinite(result.history["loss"]))
    assert any(not np.allclose(a, b) for a, b in zip(before, base.get_weights()))
    with pytest.raises(ValueError, match="precision="):
        tlkeras.pretrain(base, x[:8], precision="float16")


def test_gradient_reversal_reverses_gradient_and_saves_in_safe_mode(tmp_path):
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)), tf.float32)
    dense = keras.layers.Dense(2)
    layer = GradientReversal(0.7)

    def gradient(reverse):
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = layer(x) if reverse else x
            y = tf.reduce_sum(dense(h) ** 2)
        return tape.gradient(y, x).numpy(), y.numpy()

    plain, y_plain = gradient(False)
    reversed_, y_reversed = gradient(True)
    assert y_plain == pytest.approx(y_reversed)  # identity forward
    np.testing.assert_allclose(reversed_, -0.7 * plain, rtol=1e-5)
    # Check against a finite difference of the plain function.
    eps, probe = 1e-2, np.zeros((4, 3), "float32")
    probe[1, 2] = eps
    y_up = tf.reduce_sum(dense(x + probe) ** 2).numpy()
    y_down = tf.reduce_sum(dense(x - probe) ** 2).numpy()
    assert reversed_[1, 2] == pytest.approx(-0.7 * (y_up - y_down) / (2 * eps), rel=1e-2)

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(1)(GradientReversal(0.3)(inputs)))
    path = str(tmp_path / "grl.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.layers[1], GradientReversal)
    assert loaded.layers[1].get_config()["factor"] == 0.3
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def _source_target():
    """Source: clean digits 0-4; target: the same digits, inverted and tinted (a real shift)."""
    x, y = digits_rgb(16, classes=[0, 1, 2, 3, 4])
    tint = np.array([1.0, 0.6, 0.3], "float32")
    target = np.clip((255.0 - x) * tint, 0, 255).astype("uint8")
    return x[:400], y[:400], target[400:700], y[400:700]


def test_adapt_coral_and_dann_use_unlabeled_target(digits_base, caplog):
    xs, ys, xt, yt = _source_target()
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(keras.saving.load_model(digits_base), 5, weights=None)
    source = tlkeras.data.from_arrays(xs, ys, batch_size=32, seed=0)
    tlkeras.fine_tune(model, source, head_epochs=3, fine_tune_epochs=0, learning_rate=1e-2,
                      verbose=0)
    target = tf.data.Dataset.from_tensor_slices(xt).batch(32)  # images only: no labels exist
    assert not isinstance(target.element_spec, tuple)
    target_val = tlkeras.data.from_arrays(xt[:100], yt[:100], batch_size=50, shuffle=False)

    head = [w.copy() for w in model.get_layer("predictions").get_weights()]
    coral = tlkeras.adapt(model, source, target, method="coral", epochs=3,
                          target_validation_data=target_val, verbose=0)
    assert coral.model is model and coral.selected_by == "target_validation"
    assert coral.covariance_gap_after < coral.covariance_gap_before / 2  # measured on features
    assert any(not np.allclose(a, b)
               for a, b in zip(head, model.get_layer("predictions").get_weights()))

    base_before = [w.copy() for w in tlkeras.get_base(model).get_weights()]
    with caplog.at_level(logging.WARNING, logger="tlkeras"):
        dann = tlkeras.adapt(model, source, xt, method="dann", epochs=2, seed=0, verbose=0)
    assert "no labeled target validation" in caplog.text
    assert dann.selected_by == "source_training_loss" and dann.best_epoch in (0, 1)
    assert "domain_loss" in dann.history
    assert any(not np.allclose(a, b)
               for a, b in zip(base_before, tlkeras.get_base(model).get_weights()))
    assert [layer.name for layer in model.layers][-1] == "predictions"  # no domain head left
    assert not tlkeras.get_base(model).trainable
    assert model.predict(xt[:4], verbose=0).shape == (4, 5)

    with pytest.raises(ValueError, match="method in"):
        tlkeras.adapt(model, source, target, method="mmd")
    with pytest.raises(ValueError, match="source_data"):
        tlkeras.adapt(model, target, target)


def test_cluster_and_similar_on_pretrained_features(digits_base, tmp_path):
    x, y = digits_rgb(16, classes=[5, 6, 7, 8, 9])  # classes the base never saw
    x, y = x[:160], y[:160]
    model = tlkeras.build_transfer_model(keras.saving.load_model(digits_base), 5, weights=None)
    result = tlkeras.cluster(model, x, labels=y, max_clusters=6)
    assert result.labels.shape == (160,) and 2 <= result.n_clusters <= 6
    assert set(result.silhouette_by_k) == set(range(2, 7))
    assert result.silhouette == max(result.silhouette_by_k.values())
    fixed = tlkeras.cluster(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(40),
                            n_clusters=5)
    assert fixed.n_clusters == 5 and fixed.nmi > 0.3 and fixed.purity > 0.5  # labels from data

    index_path = tmp_path / "index.npz"
    found = tlkeras.similar(model, x[:120], x[120:], k=10, index_labels=y[:120],
                            query_labels=y[120:], index_path=index_path)
    assert found.indices.shape == (40, 10) and found.recall_at_k > 0.7
    assert np.all(np.diff(found.similarities, axis=1) <= 1e-6)  # nearest first
    reloaded = tlkeras.similar(model, index_path, x[120:], k=10, query_labels=y[120:])
    np.testing.assert_array_equal(reloaded.indices, found.indices)
    assert reloaded.recall_at_k == found.recall_at_k
    np.testing.assert_array_equal(NeighborIndex.load(index_path).labels, y[:120])
    with pytest.raises(ValueError, match="k in"):
        tlkeras.similar(model, index_path, x[:2], k=500)


def test_coral_gap_measure():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 5))
    assert covariance_gap(a, a) == 0.0
    assert covariance_gap(a, 2 * a) > 0.0


def test_cli_pretrain_adapt_cluster(digits_base, tmp_path, capsys):
    from PIL import Image

    from tlkeras import cli

    xs, ys, xt, _ = _source_target()
    for i in range(60):
        folder = tmp_path / "source" / str(ys[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(xs[i]).save(folder / f"{i}.png")
        (tmp_path / "target" / "any").mkdir(parents=True, exist_ok=True)
        Image.fromarray(xt[i]).save(tmp_path / "target" / "any" / f"{i}.png")
    model = tlkeras.build_transfer_model(keras.saving.load_model(digits_base), 5, weights=None)
    model.save(tmp_path / "model.keras")

    assert cli.main(["pretrain", "--model", digits_base, "--unlabeled_dir", tmp_path / "target",
                     "--run_dir", tmp_path / "run", "--epochs", "1", "--batch_size", "16",
                     "--precision", "mixed_float16"]) == 0
    adapted = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert adapted.output_shape == (None, 4, 4, 32)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["precision"] == "mixed_float16"
    assert all(w.dtype == "float32" for w in adapted.weights)

    assert cli.main(["adapt", "--model", tmp_path / "model.keras", "--image_dir",
                     tmp_path / "source", "--target_dir", tmp_path / "target", "--epochs", "2",
                     "--output", tmp_path / "adapted.keras"]) == 0
    assert "picked by source validation" in capsys.readouterr().out
    assert keras.saving.load_model(tmp_path / "adapted.keras").output_shape == (None, 5)

    out = tmp_path / "clusters.csv"
    assert cli.main(["cluster", "--model", tmp_path / "adapted.keras", "--image_dir",
                     tmp_path / "target", "--n_clusters", "3", "--output", out]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "file,cluster" and len(lines) == 61
    assert {line.rsplit(",", 1)[1] for line in lines[1:]} <= {"0", "1", "2"}
    assert cli.main(["cluster", "--model", tmp_path / "model.keras", "--image_dir",
                     tmp_path / "nowhere"]) == 2


@pytest.mark.heavy
def test_domain_shift_recipe_smoke(tmp_path):
    import sys

    from conftest import REPO

    sys.path.insert(0, REPO)
    from recipes import domain_shift

    result = domain_shift.main(["--smoke", "--output_dir", str(tmp_path)])
    assert result["adapt"].covariance_gap_after < result["adapt"].covariance_gap_before
    assert result["similar"].indices.shape == (20, 10)
    assert os.path.isfile(tmp_path / "index.npz")
    assert os.path.isfile(tmp_path / "pretrain" / "model.keras")
