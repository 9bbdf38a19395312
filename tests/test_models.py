"""build_transfer_model: weights files, frozen BatchNorm, mixed precision, saving, real weights."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tlkeras
from conftest import REPO, XCEPTION_WEIGHTS, digits_rgb

SIZE = 32


def _mobilenet(weights=None, **kwargs):
    return tlkeras.build_transfer_model("MobileNetV2", 3, input_shape=(SIZE, SIZE, 3), weights=weights, **kwargs)


def _randomize(base, seed=0):
    rng = np.random.default_rng(seed)
    base.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype) for w in base.get_weights()])


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A base with non-default weights, saved in the three file kinds."""
    d = tmp_path_factory.mktemp("weights")
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    _randomize(base)
    base.save_weights(str(d / "base.weights.h5"))
    base.save(str(d / "legacy.h5"))  # Keras 2 style HDF5 file
    full = tlkeras.build_transfer_model(base, 3)
    full.save(str(d / "full_model.keras"))
    x = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3)).astype("float32")
    reference = base(keras.applications.mobilenet_v2.preprocess_input(x.copy())).numpy()
    return d, x, reference


@pytest.mark.parametrize("file_name", ["base.weights.h5", "legacy.h5", "full_model.keras"])
def test_weights_from_each_file_kind_match_loading_by_hand(weight_files, file_name):
    d, x, reference = weight_files
    model = _mobilenet(weights=str(d / file_name))
    extractor, _ = tlkeras.split_model(model)
    base_out = tlkeras.get_base(model)(model.get_layer("preprocessing")(x)).numpy()
    np.testing.assert_allclose(base_out, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extractor(x).numpy(), reference.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_missing_and_mismatched_weights_files_fail_clearly(weight_files, tmp_path):
    d, _, _ = weight_files
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        _mobilenet(weights=str(missing))
    for file_name in ["base.weights.h5", "full_model.keras"]:
        with pytest.raises(ValueError, match=f"{file_name}.*(match|architecture)"):
            tlkeras.build_transfer_model("MobileNet", 3, input_shape=(SIZE, SIZE, 3), weights=str(d / file_name))
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.npz.*expected"):
        _mobilenet(weights=str(bad))


def test_imagenet_download_failure_says_what_to_do_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # empty cache, so Keras must download
    import importlib

    from keras.src.backend import config

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # no network, even where there is one
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    info = tlkeras.models.weights_info("MobileNetV2")
    assert info["url"].startswith("https://") and info["file_name"].endswith(".h5")
    with pytest.raises(tlkeras.models.WeightsDownloadError) as raised:
        _mobilenet(weights="imagenet")
    message = str(raised.value)
    assert "weights=" in message and info["url"] in message
    assert os.path.join(str(tmp_path), "models") in message
    importlib.invalidate_caches()


def test_batchnorm_statistics_never_move_but_weights_train():
    # ResNet50: random-init MobileNetV2 saturates its ReLU6s, giving vanishing gradients.
    model = tlkeras.build_transfer_model("ResNet50", 3, input_shape=(SIZE, SIZE, 3), weights=None, dropout=0.0)
    tlkeras.unfreeze(model, "all")
    base = tlkeras.get_base(model)
    bns = [l for l in base.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(not l.trainable for l in bns)
    stats = [(l.moving_mean.numpy().copy(), l.moving_variance.numpy().copy()) for l in bns]
    convs = [l for l in base.layers if l.trainable_weights]
    kernels = [l.trainable_weights[0].numpy().copy() for l in convs]
    x, y = digits_rgb(SIZE, classes=[0, 1, 2])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", run_eagerly=True)
    model.fit(x[:64], y[:64], epochs=1, batch_size=16, verbose=0)
    for layer, (mean, var) in zip(bns, stats):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)
        np.testing.assert_array_equal(layer.moving_variance.numpy(), var)
    changed = sum(not np.allclose(l.trainable_weights[0].numpy(), k) for l, k in zip(convs, kernels))
    assert changed == len(convs)


def test_trainable_layers_and_freeze():
    model = _mobilenet(trainable_layers=10)
    base = tlkeras.get_base(model)
    layers = [l for l in base.layers if not isinstance(l, keras.layers.InputLayer)]
    trainable = {l.name for l in layers if l.trainable}
    top = {l.name for l in layers[-10:] if not isinstance(l, keras.layers.BatchNormalization)}
    assert trainable == top
    text = tlkeras.trainable_summary(model, print_fn=None)
    assert "block_16" in text and "partly" in text
    tlkeras.freeze(model)
    assert not base.trainable_weights
    assert len(model.trainable_weights) == 2  # the head's kernel and bias


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("task,classes", [("multiclass", 3), ("binary", None), ("regression", 1)])
def test_output_is_float32_under_mixed_precision(policy, task, classes):
    keras.mixed_precision.set_global_policy(policy)
    model = tlkeras.build_transfer_model(
        "MobileNetV2", classes, task=task, input_shape=(SIZE, SIZE, 3), weights=None, hidden_units=(8,)
    )
    assert tlkeras.get_base(model).compute_dtype == policy.split("_")[1]
    out = model(np.zeros((2, SIZE, SIZE, 3), "uint8"))
    assert out.dtype == "float32"
    if task == "multiclass":
        np.testing.assert_allclose(out.numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_keras_save_and_safe_mode_load_give_identical_predictions(tmp_path):
    model = tlkeras.build_transfer_model("ResNet50", 4, task="multilabel", input_shape=(SIZE, SIZE, 3),
                                         weights=None, hidden_units=(16,), augmentation=[keras.layers.RandomFlip()])
    x = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3)).astype("uint8")
    expected = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    assert loaded.get_layer("preprocessing").mode == "caffe"
    assert tlkeras.models.infer_task(loaded) == "multilabel"
    tlkeras.unfreeze(loaded, 2, unit="blocks")
    assert [b for b, _ in tlkeras.models.base_blocks(tlkeras.get_base(loaded))][-1] == "conv5_block3"


def test_user_model_as_base_and_bad_arguments():
    base = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255),
                             keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(), keras.layers.Conv2D(4, 3)])
    model = tlkeras.build_transfer_model(base, 2, pooling="max")
    assert model.output_shape == (None, 2) and tlkeras.get_base(model) is base
    assert [b for b, _ in tlkeras.models.base_blocks(base)][-1] == base.layers[-1].name
    with pytest.raises(ValueError, match="num_classes"):
        tlkeras.build_transfer_model(base, None)
    with pytest.raises(ValueError, match="task"):
        tlkeras.build_transfer_model(base, 2, task="ranking")
    with pytest.raises(ValueError, match="at least 71.*input_shape=\\(32, 32, 3\\)"):
        tlkeras.build_transfer_model("Xception", 2, input_shape=(32, 32, 3), weights=None)
    with pytest.raises(ValueError, match="depth"):
        tlkeras.unfreeze(model, -1)


def test_other_backend_fails_with_clear_message():
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    proc = subprocess.run([sys.executable, "-c", "import tlkeras"], env=env, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "tlkeras needs Keras 3 with the TensorFlow backend" in proc.stderr


@pytest.mark.skipif(not os.path.exists(XCEPTION_WEIGHTS), reason=f"real weights absent: {XCEPTION_WEIGHTS}")
def test_real_xception_weights_separate_classes_far_better_than_random():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    x, y = digits_rgb(71, classes=[3, 5, 8, 9])
    x, y = x[:240], y[:240]
    scores = {}
    for weights in (XCEPTION_WEIGHTS, None):
        model = tlkeras.build_transfer_model("Xception", 4, input_shape=(71, 71, 3), weights=weights)
        extractor, _ = tlkeras.split_model(model)
        features = extractor.predict(x, batch_size=50, verbose=0)
        probe = LogisticRegression(max_iter=2000)
        scores[weights] = cross_val_score(probe, features, y, cv=3).mean()
    assert scores[XCEPTION_WEIGHTS] > 0.9, scores
    assert scores[XCEPTION_WEIGHTS] - scores[None] > 0.3, scores


def test_base_runs_in_inference_mode_even_when_fit_passes_training_true():
    # Keras 3 passes the outer training flag to nested models; tlkeras' base ignores it.
    base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                             keras.layers.BatchNormalization(), keras.layers.Dropout(0.9)])
    model = tlkeras.build_transfer_model(base, 2, dropout=0.0)
    tlkeras.unfreeze(model, "all")
    base.layers[1].trainable = True  # even a BatchNormalization forced trainable keeps its statistics
    x = np.random.default_rng(0).normal(100, 50, (4, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(model(x, training=True).numpy(), model(x, training=False).numpy())
    mean = base.layers[1].moving_mean.numpy().copy()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, np.array([0, 1, 0, 1]), epochs=1, verbose=0)
    np.testing.assert_array_equal(base.layers[1].moving_mean.numpy(), mean)
