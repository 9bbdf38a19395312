"""tlkeras.export_model: every format round-trips and is verified; int8 keeps accuracy."""

import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tlkeras
from tlkeras.export import ExportError, ExportVerificationError, export_model, run_tflite

CLASSES = [f"digit_{i}" for i in range(10)]
INT8_MAX_ACCURACY_DROP = 0.03  # int8 TFLite vs the float model on held-out digits


@pytest.fixture(scope="module")
def trained(digits32):
    """A small tlkeras model trained on scikit-learn digits (32x32 RGB); (model, x_test, y_test)."""
    x, y = digits32
    base = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        ]
    )
    model = tlkeras.build_transfer_model(
        base, num_classes=10, weights=None, dropout=0.0, pooling=None
    )
    tlkeras.unfreeze(model, "all")
    model.compile(
        keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(x[:1300], y[:1300], epochs=5, batch_size=64, verbose=0)
    x_test, y_test = x[1300:].astype("float32"), y[1300:]
    accuracy = np.mean(model.predict(x_test, verbose=0).argmax(-1) == y_test)
    assert accuracy > 0.9, accuracy
    return model, x_test, y_test


def encode(images, fmt, **kwargs):
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype="uint8")).save(buffer, format=fmt, **kwargs)
        out.append(buffer.getvalue())
    return out


def test_every_format_round_trips(trained, tmp_path):
    model, x_test, _ = trained
    data = tf.data.Dataset.from_tensor_slices((x_test[:40], np.zeros(40))).batch(16)
    result = export_model(model, tmp_path, class_names=CLASSES, representative_data=data)

    assert set(result.paths) == {"keras", "saved_model", "tflite", "labels"}
    assert set(result.checks) == {"keras", "saved_model", "saved_model_bytes", "tflite"}
    for check in result.checks.values():
        assert check["max_abs_diff"] <= check["tolerance"] and check["top1_agreement"] == 1.0
    assert (tmp_path / "labels.txt").read_text().splitlines() == CLASSES

    images = x_test[100:132]
    expected = model.predict(images, verbose=0)
    reloaded = keras.saving.load_model(result.paths["keras"], safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, atol=1e-6)
    np.testing.assert_allclose(run_tflite(result.paths["tflite"], images), expected, atol=1e-5)

    serving = tf.saved_model.load(result.paths["saved_model"])
    assert set(serving.signatures) == {"serving_default", "serving_bytes"}
    outputs = serving.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-6)
    assert [c.decode() for c in outputs["classes"].numpy()] == [
        CLASSES[i] for i in expected.argmax(-1)
    ]


def test_bytes_signature_decodes_real_jpeg_and_png(trained, tmp_path):
    model, x_test, _ = trained
    result = export_model(model, tmp_path, formats=["saved_model"], class_names=CLASSES)
    serve_bytes = tf.saved_model.load(result.paths["saved_model"]).signatures["serving_bytes"]
    images = x_test[:64]
    expected = model.predict(images, verbose=0)

    png = serve_bytes(image_bytes=tf.constant(encode(images, "PNG")))
    # Lossless PNG: the same pixels, so the same probabilities up to float32 rounding (one batch
    # of 64 here, two of 32 in predict: 2e-6 apart in one full-suite run).
    np.testing.assert_allclose(png["probabilities"], expected, atol=1e-5)
    assert [c.decode() for c in png["classes"].numpy()] == [CLASSES[i] for i in expected.argmax(-1)]

    jpeg = serve_bytes(image_bytes=tf.constant(encode(images, "JPEG", quality=95)))
    assert np.mean(jpeg["probabilities"].numpy().argmax(-1) == expected.argmax(-1)) >= 0.95

    # Other sizes and grayscale files are decoded to RGB and resized to 32x32 inside.
    large = [
        np.asarray(Image.fromarray(i.astype("uint8")).resize((64, 48), Image.BILINEAR))
        for i in images[:16]
    ]
    gray = [Image.fromarray(i.astype("uint8")).convert("L") for i in images[:16]]
    mixed = encode(large, "PNG") + encode(gray, "PNG")
    probabilities = serve_bytes(image_bytes=tf.constant(mixed))["probabilities"].numpy()
    assert probabilities.shape == (32, 10)
    assert (
        np.mean(
            probabilities.argmax(-1) == np.concatenate([expected[:16], expected[:16]]).argmax(-1)
        )
        >= 0.9
    )


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
@pytest.mark.parametrize("quantize", ["dynamic", "float16", "int8"])
def test_quantized_tflite_keeps_accuracy(trained, tmp_path, quantize):
    model, x_test, y_test = trained
    result = export_model(
        model, tmp_path, formats="tflite", quantize=quantize, representative_data=x_test[:100]
    )
    check = result.checks["tflite"]
    assert 0 < check["max_abs_diff"] <= check["tolerance"]  # quantized: close, not identical
    float_accuracy = np.mean(model.predict(x_test, verbose=0).argmax(-1) == y_test)
    tflite_accuracy = np.mean(run_tflite(result.paths["tflite"], x_test).argmax(-1) == y_test)
    assert tflite_accuracy >= float_accuracy - INT8_MAX_ACCURACY_DROP, (
        quantize,
        float_accuracy,
        tflite_accuracy,
    )
    if quantize == "int8":
        interpreter = tf.lite.Interpreter(model_path=result.paths["tflite"])
        kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
        assert np.int8 in kinds  # really quantized
        assert interpreter.get_input_details()[0]["dtype"] == np.float32  # still takes raw pixels


def test_mismatch_beyond_tolerance_raises(trained, tmp_path):
    model, x_test, _ = trained
    with pytest.raises(
        ExportVerificationError,
        match=r"tflite export .* max abs diff [0-9.e-]+ exceeds the tolerance 1e-09",
    ):
        export_model(
            model,
            tmp_path,
            formats="tflite",
            quantize="int8",
            representative_data=x_test[:50],
            tolerances={"tflite_int8": 1e-9},
        )


def test_unserializable_model_names_the_format(tmp_path):
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(
        keras.layers.Lambda(lambda t: keras.ops.mean(t, axis=(1, 2)))(inputs)
    )
    model = keras.Model(inputs, outputs, name="with_lambda")
    with pytest.raises(ExportError, match=r"model 'with_lambda' as keras .*safe_mode"):
        export_model(model, tmp_path, formats=["keras"])
    # The other formats do not need Keras deserialization.
    result = export_model(model, tmp_path, formats=["saved_model", "tflite"])
    assert result.checks["saved_model_bytes"]["max_abs_diff"] <= 1e-5


def test_clear_errors(trained, tmp_path):
    model, x_test, _ = trained
    with pytest.raises(ValueError, match="needs representative_data"):
        export_model(model, tmp_path, quantize="int8")
    with pytest.raises(ValueError, match="formats"):
        export_model(model, tmp_path, formats=["onnx"])
    with pytest.raises(ValueError, match="class_names has 3 names but model .* has 10 output"):
        export_model(model, tmp_path, class_names=["a", "b", "c"])
    with pytest.raises(
        ValueError, match=r"representative_data must hold images of shape \(32, 32, 3\)"
    ):
        export_model(model, tmp_path, formats="tflite", representative_data=x_test[:4, :16, :16])
    flexible = keras.Sequential(
        [keras.Input((None, None, 3)), keras.layers.GlobalAveragePooling2D()]
    )
    with pytest.raises(ValueError, match="fixed size"):
        export_model(flexible, tmp_path)


def test_model_with_augmentation_layers_exports_to_every_format(tmp_path):
    base = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                             keras.layers.Conv2D(4, 3, activation="relu")])
    model = tlkeras.build_transfer_model(
        base, 3, augmentation=[keras.layers.RandomFlip(), keras.layers.RandomRotation(0.1)])
    result = tlkeras.export_model(model, tmp_path, formats=("keras", "saved_model", "tflite"))
    assert set(result.checks) >= {"keras", "saved_model", "tflite"}
    reloaded = keras.saving.load_model(result.paths["keras"])
    assert "augmentation" in [layer.name for layer in reloaded.layers]  # .keras keeps it for training
