"""Exporting a trained model, verified: `.keras`, TF Serving SavedModel, TFLite.

Every export is reloaded and its predictions on a few images compared with
the in-memory model before `export_model` returns; the error reached is
reported in `ExportResult.checks`, and an error beyond the format's expected
tolerance raises `ExportVerificationError`.

Example:

>>> import io, keras, numpy as np, tensorflow as tf, tlkeras
>>> from PIL import Image
>>> images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
>>> base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3)], name="tiny")
>>> model = tlkeras.build_transfer_model(base, 2)
>>> result = tlkeras.export_model(model, "export/tiny", class_names=["cat", "dog"],
...                               quantize="int8", representative_data=images)
>>> result.paths
{'labels': 'export/tiny/labels.txt', 'keras': 'export/tiny/model.keras',
 'saved_model': 'export/tiny/saved_model', 'tflite': 'export/tiny/model.tflite'}
>>> sorted(result.checks["tflite"])
['max_abs_diff', 'tolerance', 'top1_agreement']
>>> result.checks["tflite"]["max_abs_diff"] <= result.checks["tflite"]["tolerance"]
True

Serving the SavedModel (TF Serving, or in Python):

>>> buffer = io.BytesIO()
>>> Image.new("RGB", (40, 30), "red").save(buffer, format="JPEG")
>>> serving = tf.saved_model.load("export/tiny/saved_model")
>>> outputs = serving.signatures["serving_bytes"](image_bytes=tf.constant([buffer.getvalue()]))
>>> outputs["probabilities"].shape, outputs["classes"].shape
(TensorShape([1, 2]), TensorShape([1]))
"""

import contextlib
import dataclasses
import functools
import io
import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from tlkeras import atomic, models

FORMATS = ("keras", "saved_model", "tflite")
QUANTIZE = (None, "dynamic", "float16", "int8")

# Expected error of each export: max |exported - model| over the verification
# images, divided by max(1, max |model|) (for probabilities: the absolute
# difference). Quantized TFLite keys are "tflite_<quantize>".
TOLERANCES = {
    "keras": 1e-5,
    "saved_model": 1e-5,
    "saved_model_bytes": 1e-5,  # PNG of the verification images: lossless
    "tflite": 1e-4,
    "tflite_float16": 0.02,
    "tflite_dynamic": 0.1,
    "tflite_int8": 0.25,
}


class ExportError(RuntimeError):
    """An export could not be written or reloaded."""


class ExportVerificationError(ExportError):
    """A reloaded export predicts differently from the in-memory model."""


@dataclasses.dataclass
class ExportResult:
    """What `export_model` wrote and how closely each export matches the model.

    Attributes:
        directory: the export directory.
        paths: `{"keras" | "saved_model" | "tflite" | "labels": path}`.
        checks: `{check: {"max_abs_diff", "top1_agreement", "tolerance"}}` for
            checks "keras", "saved_model" (pixel signature),
            "saved_model_bytes" (bytes signature fed PNGs) and "tflite".
    """

    directory: str
    paths: dict
    checks: dict


def _whole(export):
    """Runs `export` into a temporary folder and moves it into place only once verified.

    A re-export killed or failing mid-way leaves the previous export as it was: a
    reader never sees a half-written folder or one mixing two models. Files in the
    folder that are not export outputs are kept (hard-linked into the new folder).
    """

    @functools.wraps(export)
    def wrapper(model, directory, *args, **kwargs):
        target = os.path.abspath(os.fspath(directory))
        with atomic.folder(target) as tmp:
            if os.path.isdir(target):
                for name in os.listdir(target):
                    if name not in _OUTPUTS and not name.startswith("."):
                        _link_copy(os.path.join(target, name), os.path.join(tmp, name))
            try:
                result = export(model, tmp, *args, **kwargs)
            except ExportError as error:  # name the folder the user asked for, not the temporary
                kept = " The previous export there is kept." if os.path.isdir(target) else ""
                raise type(error)(str(error).replace(tmp, target) + kept) from error
        result.directory = str(directory)
        result.paths = {k: os.path.join(str(directory), os.path.relpath(v, tmp))
                        for k, v in result.paths.items()}
        return result

    return wrapper


_OUTPUTS = ("labels.txt", "model.keras", "saved_model", "model.tflite")


def _link_copy(source, target):
    import shutil

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if os.path.isdir(source) and not os.path.islink(source):
        shutil.copytree(source, target, symlinks=True, copy_function=link)
    else:
        link(source, target)


@_whole
def export_model(
    model,
    directory,
    *,
    formats=FORMATS,
    class_names=None,
    quantize=None,
    representative_data=None,
    verify=True,
    num_verification_images=8,
    tolerances=None,
):
    """Exports `model` and verifies every export against it.

    Outputs, in `directory`:

    - `model.keras`: the Keras model, reloadable with
      `keras.saving.load_model(path)` (checked in safe mode).
    - `saved_model/`: for TF Serving, with signatures
      `serving_default(images)`: float32 raw RGB pixels `(B, H, W, 3)` in
      [0, 255], and `serving_bytes(image_bytes)`: a batch of encoded JPEG/PNG
      (or BMP/GIF first frame) strings, decoded to RGB and resized bilinearly
      to the model's input size inside. Both return `probabilities`, and
      `classes` (the top-1 class name; for one sigmoid unit: names[p >= 0.5])
      when `class_names` is given.
    - `model.tflite`: float32 (`quantize=None`), `"dynamic"` (int8 weights),
      `"float16"` (float16 weights) or `"int8"` (weights and activations,
      calibrated on `representative_data`; inputs and outputs stay float32
      so the model keeps taking raw pixels and returning probabilities).
    - `labels.txt`: one class name per line, when `class_names` is given.

    Args:
        model: a `keras.Model` taking images `(B, H, W, 3)` of a fixed size.
        directory: where to write (created; a previous export there is replaced whole,
            only once the new one is written and verified).
        formats: a subset of `("keras", "saved_model", "tflite")`.
        class_names: names of the model's output classes.
        quantize: TFLite quantization: None, "dynamic", "float16" or "int8".
        representative_data: raw images for int8 calibration and for
            verification: an array `(N, H, W, 3)`, or a `tf.data.Dataset` of
            images or `(images, labels)` (batched or not). Without it,
            verification uses random images.
        verify: reload each export and compare it with `model`.
        num_verification_images: how many images verification uses.
        tolerances: overrides of `TOLERANCES`, e.g. `{"tflite_int8": 0.4}`.

    Returns:
        An `ExportResult`.

    Raises:
        ExportVerificationError: an export differs beyond its tolerance; the
            message names the format, the tolerance and the observed error.
        ExportError: an export failed (the message keeps the cause, e.g. a
            layer that cannot be serialized). A model with a `HubLayer` or a
            `Lambda` layer saves to `.keras` but does not reload in safe mode;
            export it with `formats=("saved_model", "tflite")`.
    """
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"Expected formats from {FORMATS}, received formats={formats!r}.")
    if quantize not in QUANTIZE:
        raise ValueError(f"Expected quantize in {QUANTIZE}, received quantize={quantize!r}.")
    if quantize is not None and "tflite" not in formats:
        raise ValueError(
            f"quantize={quantize!r} applies to TFLite, but 'tflite' is not in formats={formats}."
        )
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "quantize='int8' needs representative_data: images to calibrate activation ranges."
        )
    if model.inputs[0].dtype == "string":
        return _export_text_model(model, directory, formats, class_names, representative_data,
                                  verify, {**TOLERANCES, **(tolerances or {})})
    size = _input_size(model)
    num_outputs = model.output_shape[-1]
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        expected = 2 if num_outputs == 1 else num_outputs
        if len(class_names) != expected:
            raise ValueError(
                f"class_names has {len(class_names)} names but model {model.name!r} has "
                f"{num_outputs} output(s), i.e. {expected} classes."
            )
    tolerances = {**TOLERANCES, **(tolerances or {})}
    calibration = (
        _images(representative_data, 200, size) if representative_data is not None else None
    )
    if calibration is not None and len(calibration) == 0:
        raise ValueError("representative_data yielded no images.")
    if calibration is not None:  # integer pixel values, so that PNGs of them are exact
        samples = np.clip(np.rint(calibration[:num_verification_images]), 0, 255)
    else:
        samples = (
            np.random.default_rng(0)
            .integers(0, 256, (num_verification_images, *size, 3))
            .astype("float32")
        )
    expected = np.asarray(model.predict_on_batch(samples), dtype="float32")

    os.makedirs(directory, exist_ok=True)
    result = ExportResult(directory=str(directory), paths={}, checks={})

    def check(name, actual, tolerance_key=None):
        tolerance = tolerances[tolerance_key or name]
        result.checks[name] = _compare(
            name, expected, np.asarray(actual, dtype="float32"), tolerance
        )

    _write_labels(directory, class_names, result)
    if "keras" in formats:
        reloaded = _export_keras(model, directory, result, verify, samples)
        if verify:
            check("keras", reloaded)

    model = models.without_augmentation(model)  # inference graphs carry no random ops
    if "saved_model" in formats:
        path = result.paths["saved_model"] = os.path.join(directory, "saved_model")
        with _explained("saved_model", model, path):
            _export_saved_model(model, path, size, class_names)
        if verify:
            _verify_saved_model(path, samples, class_names, num_outputs, check)

    if "tflite" in formats:
        path = result.paths["tflite"] = os.path.join(directory, "model.tflite")
        with _explained("tflite", model, path):
            with open(path, "wb") as f:
                f.write(_convert_tflite(model, quantize, calibration))
        if verify:
            check(
                "tflite",
                run_tflite(path, samples),
                "tflite" if quantize is None else f"tflite_{quantize}",
            )
    return result


def run_tflite(path, images):
    """Predictions of the TFLite model at `path` for a batch of raw images."""
    with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], np.shape(images))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.asarray(images, dtype=inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def _export_saved_model(model, path, size, class_names):
    names = tf.constant(class_names) if class_names is not None else None

    def outputs(images):
        probabilities = tf.cast(model(images, training=False), tf.float32)
        result = {"probabilities": probabilities}
        if names is not None:
            if probabilities.shape[-1] == 1:
                top = tf.cast(probabilities[:, 0] >= 0.5, tf.int32)
            else:
                top = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
            result["classes"] = tf.gather(names, top)
        return result

    def decode(image_bytes):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), size)
        return tf.ensure_shape(image, (*size, 3))

    def serve_bytes(image_bytes):
        images = tf.map_fn(
            decode, image_bytes, fn_output_signature=tf.TensorSpec((*size, 3), tf.float32)
        )
        return outputs(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", outputs, [tf.TensorSpec((None, *size, 3), tf.float32, name="images")]
    )
    archive.add_endpoint(
        "serving_bytes", serve_bytes, [tf.TensorSpec((None,), tf.string, name="image_bytes")]
    )
    archive.write_out(path, verbose=False)


def _verify_saved_model(path, samples, class_names, num_outputs, check):
    loaded = tf.saved_model.load(path)
    results = {
        "saved_model": loaded.signatures["serving_default"](images=tf.constant(samples)),
        # The bytes signature, fed PNGs of the (integer-valued) samples.
        "saved_model_bytes": loaded.signatures["serving_bytes"](
            image_bytes=tf.constant([_png(image) for image in samples])
        ),
    }
    for name, outputs in results.items():
        check(name, outputs["probabilities"].numpy())
        if class_names is not None:
            p = outputs["probabilities"].numpy()
            top = (p[:, 0] >= 0.5).astype(int) if num_outputs == 1 else p.argmax(axis=-1)
            classes = [c.decode() for c in outputs["classes"].numpy()]
            if classes != [class_names[i] for i in top]:
                raise ExportVerificationError(
                    f"SavedModel signature of {name!r} returns classes {classes} that do not match "
                    f"its probabilities (top-1 {[class_names[i] for i in top]})."
                )


def _convert_tflite(model, quantize, calibration):
    with tempfile.TemporaryDirectory() as saved_model:
        # Through a SavedModel: from_concrete_functions loses Keras 3 variables.
        model.export(saved_model, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        if quantize is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            converter.representative_dataset = lambda: ([image[None]] for image in calibration)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return converter.convert()


def _compare(name, expected, actual, tolerance):
    if actual.shape != expected.shape:
        raise ExportVerificationError(
            f"The {name} export returns shape {actual.shape}; the model returns {expected.shape}."
        )
    error = float(np.max(np.abs(actual - expected)) / max(1.0, float(np.max(np.abs(expected)))))
    if expected.shape[-1] > 1:
        agreement = float(np.mean(actual.argmax(-1) == expected.argmax(-1)))
    else:
        agreement = float(np.mean((actual[:, 0] >= 0.5) == (expected[:, 0] >= 0.5)))
    if not error <= tolerance:  # also catches NaN
        raise ExportVerificationError(
            f"The {name} export differs from the in-memory model: max abs diff {error:.3g} exceeds "
            f"the tolerance {tolerance:g} for {name} (top-1 agreement {agreement:.0%} on "
            f"{len(expected)} images)."
        )
    return {"max_abs_diff": error, "top1_agreement": agreement, "tolerance": tolerance}


@contextlib.contextmanager
def _explained(fmt, model, path, action="Exporting"):
    """Re-raises a failure of one export as an `ExportError` naming format and path."""
    try:
        yield
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(
            f"{action} model {model.name!r} as {fmt} ({path}) failed: "
            f"{type(error).__name__}: {error}"
        ) from error


def _input_size(model):
    shape = model.input_shape
    if not (
        isinstance(shape, tuple) and len(shape) == 4 and shape[-1] == 3 and None not in shape[1:3]
    ):
        raise ValueError(
            f"export_model needs a model taking images (batch, height, width, 3) of a fixed size; "
            f"model {model.name!r} has input shape {shape}. Build it with input_shape=(h, w, 3)."
        )
    return tuple(shape[1:3])


def _images(data, limit, size):
    """Up to `limit` raw images (float32) from an array or a dataset."""
    if isinstance(data, tf.data.Dataset):
        chunks, count = [], 0
        for element in data.as_numpy_iterator():
            images = element[0] if isinstance(element, tuple) else element
            images = images[None] if images.ndim == 3 else images
            chunks.append(images)
            count += len(images)
            if count >= limit:
                break
        data = np.concatenate(chunks) if chunks else np.zeros((0, *size, 3))
    images = np.asarray(data, dtype="float32")[:limit]
    if images.ndim != 4 or images.shape[1:] != (*size, 3):
        raise ValueError(
            f"representative_data must hold images of shape {(*size, 3)}, received shape "
            f"{images.shape[1:]}."
        )
    return images


def _png(image):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


def _export_text_model(model, directory, formats, class_names, texts, verify, tolerances):
    """Text models (raw strings in): `.keras` and a SavedModel whose `serving_default`
    takes a batch of strings. TFLite cannot run the tokenizer's ops."""
    if "tflite" in formats:
        raise ExportError(
            f"TFLite: model {model.name!r} takes raw strings, and its tokenizer's ops do not "
            "convert to TFLite. Export it with formats=('keras', 'saved_model')."
        )
    if texts is None:
        texts = ["a short example sentence", "another text, somewhat longer than the first one"]
    samples = tf.constant([str(t) for t in list(texts)[:8]])
    expected = np.asarray(model.predict_on_batch(samples), dtype="float32")
    os.makedirs(directory, exist_ok=True)
    result = ExportResult(directory=str(directory), paths={}, checks={})
    _write_labels(directory, class_names, result)
    if "keras" in formats:
        reloaded = _export_keras(model, directory, result, verify, samples)
        if verify:
            result.checks["keras"] = _compare("keras", expected, reloaded, tolerances["keras"])
    if "saved_model" in formats:
        path = result.paths["saved_model"] = os.path.join(directory, "saved_model")
        with _explained("saved_model", model, path):
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(
                "serving_default",
                lambda texts: {"probabilities": tf.cast(model(texts, training=False), tf.float32)},
                [tf.TensorSpec((None,), tf.string, name="texts")],
            )
            archive.write_out(path, verbose=False)
        if verify:
            loaded = tf.saved_model.load(path)
            actual = loaded.signatures["serving_default"](texts=samples)["probabilities"]
            result.checks["saved_model"] = _compare(
                "saved_model", expected, actual.numpy(), tolerances["saved_model"])
    return result


def _write_labels(directory, class_names, result):
    if class_names is not None:
        result.paths["labels"] = os.path.join(directory, "labels.txt")
        with open(result.paths["labels"], "w") as f:
            f.write("\n".join(str(c) for c in class_names) + "\n")


def _export_keras(model, directory, result, verify, samples):
    """Saves `model.keras`; with `verify`, returns the safe-mode reload's predictions."""
    path = result.paths["keras"] = os.path.join(directory, "model.keras")
    with _explained("keras", model, path):
        model.save(path)
    if not verify:
        return None
    with _explained("keras", model, path, "Reloading (safe_mode=True)"):
        reloaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    return np.asarray(reloaded.predict_on_batch(samples), dtype="float32")
