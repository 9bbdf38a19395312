"""HubLayer over our own SavedModels, TF Hub handle caching, and hub / KerasHub bases."""

import functools
import hashlib
import http.server
import os
import shutil
import tarfile
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkeras
from tlkeras import hub

SIZE = 16


class _Module(tf.Module):
    """A reusable SavedModel as TF Hub publishes them: `__call__(images, training)`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @tf.function
    def __call__(self, images, training=False):
        return self.model(images, training=training)


def _feature_net(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            keras.layers.Conv2D(8, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, name="proj"),
        ],
        name="tiny_features",
    )


def _export(model, path):
    module = _Module(model)
    spec = tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)
    for training in (False, True):
        module.__call__.get_concrete_function(spec, training=training)
    tf.saved_model.save(module, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(SavedModel dir, the Keras model it was exported from); BN statistics made non-trivial."""
    model = _feature_net()
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 8).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 8).astype("float32"))
    return _export(model, str(tmp_path_factory.mktemp("sm") / "tiny")), model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (32, SIZE, SIZE, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > x[..., 2].mean(axis=(1, 2))).astype("int32")
    return x, y


def _classifier(layer):
    """`layer` plus a softmax head, compiled with Adam."""
    inputs = keras.Input((SIZE, SIZE, 3))
    outputs = keras.layers.Dense(2, activation="softmax", dtype="float32")(layer(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    return model


def _values(layer):
    return {v.name: np.array(v.numpy()) for v in layer.weights}


def test_predictions_match_the_original_model(exported, data):
    path, original = exported
    x, _ = data
    layer = hub.HubLayer(path)
    np.testing.assert_allclose(layer(x), original(x, training=False), atol=1e-5)
    # The module's variables are the layer's Keras weights, named without ":" or "/".
    assert len(layer.weights) == len(original.weights) == 8
    assert not [v.name for v in layer.weights if ":" in v.name or "/" in v.name]
    assert layer.trainable_weights == []
    # `training` reaches the module (batch statistics) only when the layer trains.
    trainable = hub.HubLayer(path, trainable=True)
    assert {v.name for v in trainable.non_trainable_weights} == {
        "tiny_features_bn_moving_mean",
        "tiny_features_bn_moving_variance",
    }
    in_training = trainable(x, training=True)
    assert np.abs(in_training - layer(x)).max() > 1e-3
    np.testing.assert_allclose(hub.HubLayer(path)(x, training=True), layer(x), atol=1e-5)


def _train(path, data, trainable, epochs):
    """Fits a HubLayer(path) classifier; returns the layer, its weights before, and the losses."""
    layer = hub.HubLayer(path, trainable=trainable)
    model = _classifier(layer)
    before = _values(layer)
    head_before = model.layers[-1].get_weights()[0].copy()
    history = model.fit(*data, epochs=epochs, batch_size=8, verbose=0)
    assert not np.allclose(model.layers[-1].get_weights()[0], head_before)  # the head trains
    return layer, before, history.history["loss"]


def test_adam_fine_tunes_the_module_weights(exported, data):
    layer, before, losses = _train(exported[0], data, trainable=True, epochs=6)
    after = _values(layer)
    assert losses[-1] < losses[0] - 0.02
    changed = [name for name in before if not np.allclose(before[name], after[name])]
    assert set(changed) == set(
        before
    )  # kernels, biases, BN gamma/beta and (training) BN statistics


def test_frozen_layer_changes_nothing(exported, data):
    layer, before, _ = _train(exported[0], data, trainable=False, epochs=2)
    assert layer.trainable_weights == []
    for name, value in _values(layer).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    np.testing.assert_allclose(layer(data[0]), exported[1](data[0], training=False), atol=1e-5)


def test_mixed_precision_runs_with_float32_output(exported, data):
    path, original = exported
    x, y = data
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = hub.HubLayer(path, trainable=True)
        model = _classifier(layer)
        assert layer.compute_dtype == "float16"
        assert (
            layer(keras.ops.cast(x, "float16")).dtype == "float16"
        )  # cast to float32 for the module
        history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert model.output.dtype == "float32"
        assert model.predict(x, verbose=0).dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
    np.testing.assert_allclose(hub.HubLayer(path)(x), original(x, training=False), atol=1e-5)


def test_keras_file_round_trip_keeps_fine_tuned_weights(exported, data, tmp_path, monkeypatch):
    path, original = exported
    x, y = data
    model = _classifier(hub.HubLayer(path, trainable=True))
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    file = str(tmp_path / "model.keras")
    model.save(file)
    # Safe mode trusts handles this process loaded (clone_model works), no others.
    clone = keras.models.clone_model(model)
    assert isinstance(clone.layers[1], hub.HubLayer)
    monkeypatch.setattr(hub, "_TRUSTED_HANDLES", set())  # as in a fresh process
    with pytest.raises(ValueError, match="safe_mode=False"):
        keras.models.load_model(file)
    loaded = keras.models.load_model(file, safe_mode=False)
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    hub_layer = loaded.layers[1]
    assert isinstance(hub_layer, hub.HubLayer) and hub_layer.trainable
    assert np.abs(hub_layer(x) - original(x, training=False)).max() > 1e-3  # the fine-tuned weights
    # A self-contained SavedModel export of the whole model also works.
    model.export(str(tmp_path / "exported"))
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(reloaded.serve(x), expected, atol=1e-6)


def test_keras_export_endpoints_and_signatures(data, tmp_path):
    x, _ = data
    model = _feature_net(seed=3)
    model.export(str(tmp_path / "keras_export"), verbose=False)
    expected = model(x, training=False)
    np.testing.assert_allclose(hub.HubLayer(tmp_path / "keras_export")(x), expected, atol=1e-5)
    signature = hub.HubLayer(tmp_path / "keras_export", signature="serving_default")
    np.testing.assert_allclose(signature(x), expected, atol=1e-5)
    keyed = hub.HubLayer(
        tmp_path / "keras_export", signature="serving_default", output_key="output_0"
    )
    np.testing.assert_allclose(keyed(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="no signature or function 'nope'.*serving_default"):
        hub.HubLayer(tmp_path / "keras_export", signature="nope")
    with pytest.raises(ValueError, match="output_key='logits' not in outputs"):
        hub.HubLayer(tmp_path / "keras_export", signature="serving_default", output_key="logits")(x)


def test_offline_handle_names_the_cache_folder_then_loads_from_it(
    exported, data, tmp_path, monkeypatch
):
    path, original = exported
    x, _ = data
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    handle = "https://tfhub.invalid/google/tiny_features/1"  # cannot resolve: offline
    folder = os.path.join(str(tmp_path / "cache"), hashlib.sha1(handle.encode("utf8")).hexdigest())
    with pytest.raises(OSError) as error:
        hub.HubLayer("hub:" + handle)
    message = str(error.value)
    assert handle in message and folder in message and "TFHUB_CACHE_DIR" in message
    assert "local directory" in message
    shutil.copytree(path, folder)  # what tensorflow_hub would have unpacked there
    layer = hub.HubLayer("hub:" + handle)
    np.testing.assert_allclose(layer(x), original(x, training=False), atol=1e-5)
    assert layer.get_config()["handle"] == "hub:" + handle
    with pytest.raises(FileNotFoundError, match="no such SavedModel directory"):
        hub.HubLayer(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="holds no saved_model.pb"):
        hub.HubLayer(str(tmp_path))


def test_handle_is_downloaded_as_compressed_tarball_and_cached(exported, tmp_path, monkeypatch):
    path, _ = exported
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "tiny", "w:gz") as archive:
        archive.add(path, arcname=".")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            return super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "cache"))
    handle = f"http://127.0.0.1:{server.server_address[1]}/tiny"
    try:
        local = hub.resolve(handle)
    finally:
        server.shutdown()
    assert requests == ["/tiny?tf-hub-format=compressed"]
    assert local == hub.module_dir(handle)
    assert os.path.dirname(local) == str(tmp_path / "cache")
    assert os.path.isfile(os.path.join(local, "saved_model.pb"))
    assert hub.resolve("hub:" + handle) == local  # served from the cache, server is down
    assert os.listdir(tmp_path / "cache") == [os.path.basename(local)]


def test_build_transfer_model_from_hub_module(exported, tmp_path):
    path, original = exported
    model = tlkeras.build_transfer_model("hub:" + path, num_classes=3, input_shape=(SIZE, SIZE, 3))
    base = tlkeras.get_base(model)
    assert isinstance(base, hub.HubLayer) and not base.trainable
    assert model.get_layer("preprocessing").mode == "unit"  # [0, 255] -> [0, 1]
    pixels = np.random.default_rng(1).integers(0, 256, (6, SIZE, SIZE, 3)).astype("float32")
    features, _ = tlkeras.split_model(model)
    np.testing.assert_allclose(
        features.predict(pixels, verbose=0), original(pixels / 255.0), atol=1e-5
    )
    labels = np.arange(6) % 3
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    before = _values(base)
    model.fit(pixels, labels, epochs=1, verbose=0)
    assert all(np.array_equal(v, _values(base)[k]) for k, v in before.items())
    tlkeras.unfreeze(model)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(pixels, labels, epochs=1, verbose=0)
    after = _values(base)
    assert not np.allclose(after["tiny_features_proj_kernel"], before["tiny_features_proj_kernel"])
    for name in ("tiny_features_bn_moving_mean", "tiny_features_bn_moving_variance"):
        np.testing.assert_array_equal(after[name], before[name])  # inference mode, as every base
    result = tlkeras.export_model(
        model, str(tmp_path / "exported"), formats=("saved_model",), representative_data=pixels
    )
    serving = tf.saved_model.load(result.paths["saved_model"]).signatures["serving_default"]
    np.testing.assert_allclose(
        serving(images=tf.constant(pixels))["probabilities"],
        model.predict(pixels, verbose=0),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="input_shape"):
        tlkeras.build_transfer_model(path, num_classes=3)


def _tiny_keras_hub_preset(directory):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
    )
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(32, 32),
        scale=[1 / (255 * s) for s in std],
        offset=[-m / s for m, s in zip(mean, std)],
    )
    backbone.save_to_preset(directory)
    converter.save_to_preset(directory)
    return backbone, mean, std


def test_keras_hub_image_preset_builds_trains_and_exports(tmp_path):
    preset = str(tmp_path / "preset")
    original, mean, std = _tiny_keras_hub_preset(preset)
    model = tlkeras.build_transfer_model(preset, num_classes=3, input_shape=(40, 40, 3))
    base = tlkeras.get_base(model)
    assert type(base).__name__ == "ResNetBackbone" and not base.trainable
    assert [layer.name for layer in model.layers][:4] == [
        "image",
        "preprocessing",
        f"{base.name}_inference",  # every base runs in inference mode (tlkeras.anatomy)
        "features",
    ]
    # The preset's converter takes [0, 255] pixels: resize to 32x32 and normalize.
    white = model.get_layer("preprocessing")(np.full((1, 40, 40, 3), 255.0, "float32"))
    assert white.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(white[0, 0, 0], [(1 - m) / s for m, s in zip(mean, std)], rtol=1e-4)
    for got, want in zip(base.get_weights(), original.get_weights()):
        np.testing.assert_array_equal(got, want)

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 40, 40, 3)).astype("float32")
    labels = np.arange(8) % 3
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    head_before = model.get_layer("predictions").get_weights()[0].copy()
    model.fit(pixels, labels, epochs=1, verbose=0)
    assert not np.allclose(model.get_layer("predictions").get_weights()[0], head_before)
    expected = model.predict(pixels, verbose=0)

    model.save(str(tmp_path / "model.keras"))
    loaded = keras.models.load_model(str(tmp_path / "model.keras"))  # safe mode is enough
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), expected, atol=1e-5)
    result = tlkeras.export_model(model, str(tmp_path / "exported"), representative_data=pixels)
    assert set(result.paths) == {"keras", "saved_model", "tflite"}
    serving = tf.saved_model.load(result.paths["saved_model"]).signatures["serving_default"]
    np.testing.assert_allclose(
        serving(images=tf.constant(pixels))["probabilities"], expected, atol=1e-5
    )

    random = tlkeras.build_transfer_model(preset, num_classes=3, weights=None)
    assert random.input_shape == (None, 32, 32, 3)  # the converter's size by default
    assert not np.allclose(tlkeras.get_base(random).get_weights()[0], original.get_weights()[0])


def test_keras_hub_vision_transformer_preset_pools_its_tokens(tmp_path):
    import keras_hub

    preset = str(tmp_path / "vit")
    keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    ).save_to_preset(preset)
    keras_hub.layers.ViTImageConverter(
        image_size=(32, 32), scale=1 / 127.5, offset=-1.0
    ).save_to_preset(preset)
    model = tlkeras.build_transfer_model(preset, num_classes=2)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    tokens = tlkeras.get_base(model)(model.get_layer("preprocessing")(pixels))
    assert tokens.shape == (4, 17, 16)  # [CLS] + 4x4 patches
    features, _ = tlkeras.split_model(model)
    np.testing.assert_allclose(features(pixels), np.mean(tokens, axis=1), atol=1e-5)
    first = tlkeras.build_transfer_model(preset, num_classes=2, pooling=None)
    np.testing.assert_allclose(tlkeras.split_model(first)[0](pixels), tokens[:, 0], atol=1e-5)


def test_unknown_string_base_is_a_clear_error(tmp_path):
    with pytest.raises(
        ValueError, match="not a keras.applications name.*TF Hub handle.*KerasHub preset"
    ):
        tlkeras.build_transfer_model(str(tmp_path / "nowhere"), num_classes=2)
