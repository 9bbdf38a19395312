"""Grad-CAM inside nested bases, integrated gradients, occlusion, text tokens, the sanity check."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkeras
from tlkeras.cli import main
from tests.conftest import XCEPTION_WEIGHTS, digits_rgb
from tests.test_hub import _Module
from tlkeras.explain import _GRADCAM, _spearman

SIZE = 32


def _images(n=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("uint8")


def _check_maps(explanation, n, size=SIZE):
    maps = explanation.heatmaps
    assert maps.shape == (n, size, size) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.isclose(maps.max(), 1.0)
    assert all(m.std() > 1e-3 for m in maps)  # not constant


def _assert_grad_cam_inside_base(name, size=SIZE):
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(name, num_classes=3, input_shape=(size, size, 3),
                                         weights=None)
    images = _images(2, size)
    # One call per method explains every class: the two images, each for classes 0, 1 and 2
    # (each map is scaled on its own, so this is the same as a call per class, in a third of
    # the eager passes).
    tiled, classes = np.tile(images, (3, 1, 1, 1)), np.repeat(np.arange(3), 2)
    for method in ("gradcam", "gradcam++"):
        explanation = tlkeras.explain(model, tiled, method=method, class_index=classes)
        assert explanation.heatmaps.shape == (6, size, size)
        np.testing.assert_array_equal(explanation.explained, classes)
        maps = explanation.heatmaps.reshape(3, 2, size, size)  # (class, image, H, W)
        assert maps.min() >= 0 and maps.max() <= 1
        # With random weights one class's map can be zero everywhere (ReLU of a score that
        # falls everywhere), but not every class's: the softmax's gradients sum to zero.
        assert any(m.std() > 1e-3 for m in maps)
    # ConvNeXt's grouped convolutions are compiled again on every eager call: there both methods
    # ran one pass, traced once for the model; other models run eagerly.
    traced = _GRADCAM.get(model, {}).get(None)
    if name == "ConvNeXtTiny":
        assert traced[1].experimental_get_tracing_count() == 1
    else:
        assert traced is None
    # The chosen layer lives inside the nested base, and is the last one with spatial size > 1.
    layer = tlkeras.get_base(model).get_layer(explanation.layer_name)
    assert layer.output.shape[1] * layer.output.shape[2] > 1
    # The model's own forward pass (eagerly: predict's tracing costs more than the check).
    predicted = keras.ops.convert_to_numpy(model(images, training=False)).argmax(axis=1)
    np.testing.assert_array_equal(explanation.predicted, np.tile(predicted, 3))


@pytest.mark.parametrize("name", ["MobileNetV2", "VGG16"])
def test_grad_cam_on_nested_registry_bases(name):
    _assert_grad_cam_inside_base(name)


@pytest.mark.heavy
@pytest.mark.parametrize("name", [
    "ConvNeXtTiny", "DenseNet121", "EfficientNetB0", "EfficientNetV2B0", "InceptionResNetV2",
    "InceptionV3", "MobileNet", "MobileNetV3Small", "NASNetMobile", "ResNet50", "ResNet50V2",
    "VGG19", "Xception",
])
def test_grad_cam_on_every_family(name):
    # The smallest input each architecture accepts (32 x 32 for the others).
    size = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}.get(name, SIZE)
    _assert_grad_cam_inside_base(name, size)


def _user_base():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", padding="same", name="mid_conv")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same", name="last_conv")(x)
    return keras.Model(inputs, x, name="user_base")


@pytest.fixture(scope="module")
def trained():
    """A user-base transfer model trained on real digits (0, 1, 7), and held-out images."""
    keras.utils.set_random_seed(0)
    x, y = digits_rgb(SIZE, classes=[0, 1, 7])
    model = tlkeras.build_transfer_model(_user_base(), num_classes=3, dropout=0.0)
    tlkeras.unfreeze(model)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x[:400], y[:400], epochs=6, batch_size=32, verbose=0)
    return model, x[400:], y[400:]


def test_trained_user_base_gradcam_ig_and_randomization_check(trained):
    model, x, y = trained
    assert model.evaluate(x, y, verbose=0)[1] > 0.8
    images = x[:6]
    explanation = tlkeras.explain(model, images, check=True)
    assert explanation.layer_name == "last_conv"
    _check_maps(explanation, 6)
    # Re-initialized weights give different maps; the same weights give the same maps.
    check = explanation.check
    assert check.passed and check.mean_similarity < 0.5, check
    again = tlkeras.explain(model, images)
    assert _spearman(explanation.heatmaps[0], again.heatmaps[0]) > 0.99
    # An explicit layer, and an explicit class.
    mid = tlkeras.explain(model, images[:2], layer_name="mid_conv", class_index=2)
    assert mid.layer_name == "mid_conv" and list(mid.explained) == [2, 2]
    with pytest.raises(ValueError, match="layer_name='nope'"):
        tlkeras.explain(model, images[:1], layer_name="nope")

    # Integrated gradients: attributions sum to score(x) - score(black image).
    ig = tlkeras.explain(model, images[:3], method="integrated_gradients", steps=64)
    _check_maps(ig, 3)
    p = model.predict(images[:3], verbose=0)
    p0 = model.predict(np.zeros_like(images[:1]), verbose=0)[0]
    difference = p[np.arange(3), ig.explained] - p0[ig.explained]
    np.testing.assert_allclose(ig.attributions.sum(axis=(1, 2, 3)), difference, atol=0.03)
    assert np.abs(difference).max() > 0.1  # the test is not vacuous

    # Overlays and PNGs.
    overlays = explanation.overlay()
    assert overlays.shape == (6, SIZE, SIZE, 3) and overlays.dtype == np.uint8


def test_binary_mixed_precision_model_with_augmentation():
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(_user_base(), task="binary", augmentation="light")
    for method in ("gradcam", "gradcam++", "integrated_gradients", "occlusion"):
        explanation = tlkeras.explain(model, _images(2), method=method, steps=8)
        _check_maps(explanation, 2)
        expected = (model.predict(_images(2), verbose=0)[:, 0] >= 0.5).astype(int)
        np.testing.assert_array_equal(explanation.predicted, expected)


def test_occlusion_on_exported_saved_model_and_tflite(trained, tmp_path):
    model, x, _ = trained
    images = x[:3]
    result = tlkeras.export_model(model, tmp_path / "export", formats=("saved_model", "tflite"))
    reference = tlkeras.explain(model, images, method="occlusion")
    _check_maps(reference, 3)
    for path in (result.paths["saved_model"], result.paths["tflite"]):
        explanation = tlkeras.explain(path, images, method="occlusion")
        np.testing.assert_array_equal(explanation.predicted, reference.predicted)
        np.testing.assert_allclose(explanation.heatmaps, reference.heatmaps, atol=0.05)
    paths = reference.save(tmp_path / "png")
    assert len(paths) == 3 and keras.utils.load_img(paths[0]).size == (SIZE, SIZE)

    # The command line: overlays and an index.html, from a .keras run file and from an export.
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"digit{i}.png"))
        keras.utils.save_img(files[-1], image, scale=False)
    model.save(tmp_path / "model.keras")
    for source, out in ((tmp_path / "model.keras", "cli_keras"),
                        (result.paths["saved_model"], "cli_export")):
        assert main(["explain", "--model", str(source), *files, "--output_dir",
                     str(tmp_path / out)]) == 0
        written = sorted(os.listdir(tmp_path / out))
        assert written == ["000_digit0.png", "001_digit1.png", "002_digit2.png", "index.html"]
        assert open(tmp_path / out / "index.html").read().count("<img") == 6


def test_occlusion_on_hub_saved_model_base(tmp_path):
    keras.utils.set_random_seed(1)
    features = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Conv2D(8, 5),
                                 keras.layers.GlobalAveragePooling2D()])
    module = _Module(features)
    for training in (False, True):
        module.__call__.get_concrete_function(tf.TensorSpec([None, SIZE, SIZE, 3]), training)
    tf.saved_model.save(module, str(tmp_path / "hub"))
    model = tlkeras.build_transfer_model(str(tmp_path / "hub"), num_classes=2,
                                         input_shape=(SIZE, SIZE, 3))
    with pytest.raises(ValueError, match="method='occlusion'"):
        tlkeras.explain(model, _images(1))
    _check_maps(tlkeras.explain(model, _images(2), method="occlusion", class_index=1), 2)


def test_text_token_scores_line_up_with_the_words(tmp_path):
    texts, labels = [], []
    for label, topic in enumerate(("acq", "crude")):
        folder = os.path.join(os.path.dirname(__file__), "..", "data", "reuters", topic)
        for name in sorted(os.listdir(folder))[:20]:
            with open(os.path.join(folder, name), errors="ignore") as f:
                body = f.read().split("<BODY>")[-1].split("</BODY>")[0]
            texts.append(" ".join(body.split()[:60]))
            labels.append(label)
    vectorize = keras.layers.TextVectorization(max_tokens=2000, output_mode="tf_idf")
    vectorize.adapt(texts)
    inputs = keras.Input((), dtype="string")
    outputs = keras.layers.Dense(2, activation="softmax")(vectorize(inputs))
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(tf.constant(texts), np.array(labels), epochs=20, verbose=0)
    explanation = tlkeras.explain(model, [texts[0], texts[-1]])
    assert explanation.heatmaps is None
    for text, pairs in zip([texts[0], texts[-1]], explanation.tokens):
        assert [token for token, _ in pairs] == text.split()
        assert max(score for _, score in pairs) > 0
    assert "<span" in open(explanation.save(tmp_path)[0]).read()


@pytest.mark.heavy
@pytest.mark.skipif(not os.path.isfile(XCEPTION_WEIGHTS)
                    or not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="needs ../shared/weights and Debian's Fashion-MNIST files")
def test_pointing_game_on_cluttered_canvases_with_real_xception_weights():
    """Fashion-MNIST items pasted at random places on clutter: the Grad-CAM peak finds them."""
    from bench.bench_explain import canvases, pointing_game, train_localizer

    model = train_localizer(200)
    x, y, boxes = canvases(60, seed=1)
    chance = 40 * 40 / 128**2
    rate = pointing_game(tlkeras.explain(model, x, method="gradcam++", class_index=y).heatmaps,
                         boxes)
    assert rate > 2.5 * chance, (rate, chance)
