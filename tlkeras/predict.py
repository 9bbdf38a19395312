"""Predictions from any model tlkeras makes: in memory, a run folder, a `.keras` file, an export.

`predict(model_or_run, inputs, top_k=3)` takes

- the model: a `keras.Model`, a `Run` (see `load_run`), a run folder (written by
  `fine_tune(..., log_dir=...)` or `tlkeras train --run_dir`), a `.keras` file,
  an export folder or one of its parts (written by `tlkeras.export_model`): a
  SavedModel folder or a `.tflite` file;
- the inputs: image files and folders (decoded by `tlkeras.data.from_files`:
  unreadable files are skipped and listed), arrays of raw pixels, or, for a
  text model, strings;

and returns `Predictions`: probabilities, the top-k classes and their names
(from `class_names=`, the run, or the export's `labels.txt`).

Example:

>>> import numpy as np, tlkeras
>>> model = tlkeras.build_transfer_model(
...     "MobileNetV2", num_classes=3, input_shape=(32, 32, 3), weights=None)
>>> images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3))
>>> result = tlkeras.predict(model, images, top_k=2, class_names=["a", "b", "c"])
>>> result.probabilities.shape, result.top_k.shape
((2, 3), (2, 2))
>>> sorted(result.to_rows()[0])
['index', 'label_1', 'label_2', 'probability_1', 'probability_2']
"""

import csv
import dataclasses
import io
import json
import os
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from tlkeras import data
from tlkeras import export as export_module
from tlkeras import hub  # noqa: F401 - registers HubLayer for loading .keras files
from tlkeras import layers  # noqa: F401 - registers tlkeras layers for loading .keras files
from tlkeras import text
from tlkeras import tta as tta_module  # `tta` is an argument
from tlkeras import validation

__all__ = ["Predictions", "Predictor", "Run", "load_run", "predict"]


@dataclasses.dataclass
class Predictions:
    """What `predict` returns.

    Attributes:
        probabilities: `(n, classes)` float32; a binary model's single sigmoid
            output is given as two columns `[1 - p, p]`.
        top_k: `(n, k)` class indices, the most probable first.
        class_names: a name per class (`"0"`, `"1"`, ... when none is known).
        inputs: per row, the image file, the text, or the row index of an array.
        input_kind: `"file"`, `"text"` or `"index"` (the CSV column of `inputs`).
        skipped: `[(path, reason)]` of image files that could not be read.
    """

    probabilities: np.ndarray
    top_k: np.ndarray
    class_names: list
    inputs: list
    input_kind: str = "index"
    skipped: list = dataclasses.field(default_factory=list)

    @property
    def labels(self):
        """The most probable class name of each input."""
        return [self.class_names[i] for i in self.top_k[:, 0]]

    def to_rows(self):
        """One flat dict per input: its file/text/index, then `label_i`, `probability_i`."""
        rows = []
        for source, p, top in zip(self.inputs, self.probabilities, self.top_k):
            row = {self.input_kind: source}
            for rank, i in enumerate(top, 1):
                row[f"label_{rank}"] = self.class_names[i]
                row[f"probability_{rank}"] = round(float(p[i]), 6)
            rows.append(row)
        return rows

    def to_csv(self, file=None):
        """Writes the rows as CSV to a path or an open file; returns the text when `file=None`."""
        rows = self.to_rows()
        out = io.StringIO() if file is None else file
        close = isinstance(file, (str, os.PathLike))
        if close:
            out = open(file, "w", newline="")
        try:
            writer = csv.DictWriter(out, list(rows[0]) if rows else [self.input_kind])
            writer.writeheader()
            writer.writerows(rows)
        finally:
            if close:
                out.close()
        return out.getvalue() if file is None else None


@dataclasses.dataclass
class Run:
    """A run folder, loaded: `path`, `model`, `class_names` (or None), `config` (the
    `config.json` of `fine_tune`, `{}` when absent) and `history` (`history.csv` as
    `{column: [values]}`, `{}` when absent)."""

    path: str
    model: keras.Model
    class_names: list | None
    config: dict
    history: dict


def load_run(run_dir):
    """Loads a run folder written by `fine_tune(..., log_dir=run_dir)` or `tlkeras train`.

    Args:
        run_dir: the folder; it must hold `model.keras` (written when the run finished).

    Returns:
        A `Run`; class names come from `labels.txt` or `config.json`.

    Example:

    >>> import os, tempfile, tlkeras
    >>> run_dir = tempfile.mkdtemp()
    >>> model = tlkeras.build_transfer_model(
    ...     "MobileNetV2", num_classes=2, input_shape=(32, 32, 3), weights=None)
    >>> model.save(os.path.join(run_dir, "model.keras"))
    >>> with open(os.path.join(run_dir, "labels.txt"), "w") as f:
    ...     _ = f.write("cat\\ndog\\n")
    >>> tlkeras.load_run(run_dir).class_names
    ['cat', 'dog']
    """
    run_dir = os.fspath(run_dir)
    model_path = os.path.join(run_dir, "model.keras")
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"load_run: folder {run_dir!r} holds no model.keras (a run writes it when it "
            "finishes; a killed run resumes with the same log_dir)."
        )
    config = {}
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    history = {}
    if os.path.isfile(os.path.join(run_dir, "history.csv")):
        with open(os.path.join(run_dir, "history.csv"), newline="") as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    history.setdefault(key, []).append(float(value) if value else float("nan"))
    return Run(run_dir, _load_keras(model_path), _names_in(run_dir), config, history)


class Predictor:
    """A model of any kind `predict` takes, loaded once: call it on a batch to get its
    outputs. Attributes: `source`, `kind` (`"keras"`, `"saved_model"`, `"tflite"`),
    `name`, `texts` (whether it takes strings), `input_shape`, `image_size`
    (`(height, width)` or None), `num_outputs` and `class_names`.

    Args:
        model_or_run: see `predict`.
        class_names: a list, or a file with one name per line; overrides the
            class names found beside the model.
    """

    def __init__(self, model_or_run, class_names=None):
        self.source, self.class_names = model_or_run, None
        if isinstance(model_or_run, Run):
            self._keras(model_or_run.model)
            self.class_names = model_or_run.class_names
        elif isinstance(model_or_run, keras.Model):
            self._keras(model_or_run)
        elif isinstance(model_or_run, (str, os.PathLike)):
            self._open(os.fspath(model_or_run))
        else:
            raise TypeError(
                "predict: expected a keras.Model, a Run, or the path of a run folder, .keras "
                f"file, export folder, SavedModel folder or .tflite file; received "
                f"{type(model_or_run).__name__}."
            )
        self.set_class_names(class_names)

    def set_class_names(self, class_names=None):
        """Sets the class names: a list, the path of a file with one per line, or None (keep
        those found beside the model, else `"0"`, `"1"`, ...); checks their number."""
        if isinstance(class_names, (str, os.PathLike)):
            class_names = _read_labels(os.fspath(class_names), required=True)
        names = self.class_names if class_names is None else [str(n) for n in class_names]
        expected = 2 if self.num_outputs == 1 else self.num_outputs
        if names is None:
            names = [str(i) for i in range(expected)]
        if len(names) != expected:
            where = "class_names" if class_names is not None else (
                self.source if isinstance(self.source, (str, os.PathLike)) else "the run")
            raise ValueError(
                f"{len(names)} class names (from {where}) but the model has {expected} classes."
            )
        self.class_names = names

    def _open(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"predict: no such model file or folder: {path!r}.")
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "model.keras")):
                run = load_run(path)
                self._keras(run.model)
                self.class_names = run.class_names
                return
            if os.path.isfile(os.path.join(path, "saved_model.pb")):
                return self._saved_model(path)
            if os.path.isfile(os.path.join(path, "saved_model", "saved_model.pb")):
                return self._saved_model(os.path.join(path, "saved_model"))
            if os.path.isfile(os.path.join(path, "model.tflite")):
                return self._tflite(os.path.join(path, "model.tflite"))
            raise ValueError(
                f"folder {path!r} holds no model.keras, saved_model.pb, saved_model/ or "
                "model.tflite: expected a run folder, an export folder or a SavedModel folder."
            )
        if path.endswith(".keras"):
            self._keras(_load_keras(path))
            self.class_names = _names_in(os.path.dirname(path))
        elif path.endswith(".tflite"):
            self._tflite(path)
        else:
            raise ValueError(
                f"predict: expected a .keras or .tflite file, or a run/export/SavedModel folder; "
                f"received {path!r}."
            )

    def _keras(self, model):
        self.kind, self.model, self.name = "keras", model, model.name
        self._set_input(model.inputs[0].dtype, model.input_shape)
        self.num_outputs = model.output_shape[-1]

    def _saved_model(self, path):
        loaded = tf.saved_model.load(path)
        if "serving_default" not in loaded.signatures:
            raise ValueError(f"SavedModel {path!r} has no 'serving_default' signature.")
        self.kind, self.model, self.name = "saved_model", loaded, os.path.basename(path)
        signature = loaded.signatures["serving_default"]
        specs = signature.structured_input_signature[1]
        if len(specs) != 1:
            raise ValueError(
                f"SavedModel {path!r}: expected one input, its signature takes {sorted(specs)}."
            )
        (self._input_name, spec), = specs.items()
        self._set_input(spec.dtype.name, tuple(spec.shape))
        outputs = signature.structured_outputs
        self._output_name = "probabilities" if "probabilities" in outputs else sorted(outputs)[0]
        self.num_outputs = outputs[self._output_name].shape[-1]
        self.class_names = _names_in(path) or _names_in(os.path.dirname(os.path.abspath(path)))

    def _tflite(self, path):
        with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_path=path)
        shape = tuple(interpreter.get_input_details()[0]["shape"])
        self.kind, self.model, self.name = "tflite", path, os.path.basename(path)
        self._set_input("float32", (None, *shape[1:]))
        self.num_outputs = int(interpreter.get_output_details()[0]["shape"][-1])
        self.class_names = _names_in(os.path.dirname(path))

    def _set_input(self, dtype, shape):
        self.texts = "string" in str(dtype)
        self.input_shape = tuple(None if s is None else int(s) for s in shape)
        self.image_size = None
        if not self.texts and len(shape) == 4 and None not in shape[1:3]:
            self.image_size = tuple(int(s) for s in shape[1:3])

    def __call__(self, batch):
        """The model's outputs (float32 numpy) for one batch of images or texts."""
        if self.kind == "keras":
            outputs = self.model.predict_on_batch(batch)
        elif self.kind == "saved_model":
            dtype = tf.string if self.texts else tf.float32
            outputs = self.model.signatures["serving_default"](
                **{self._input_name: tf.constant(batch, dtype)})[self._output_name]
        else:
            outputs = export_module.run_tflite(self.model, batch)
        return np.asarray(outputs, "float32")


def predict(model_or_run, inputs, *, top_k=3, class_names=None, batch_size=32, verbose="auto",
            tta=False):
    """Predicts the top-k classes of images or texts with any model tlkeras makes.

    Args:
        model_or_run: a `keras.Model`; a `Run` (`load_run`); the path of a run
            folder, a `.keras` file, an export folder (`tlkeras.export_model`),
            a SavedModel folder or a `.tflite` file; or a `Predictor`.
        inputs: image files and folders (a path or a list of paths), raw RGB
            pixels `(n, h, w, 3)` or one image `(h, w, 3)` (resized to the
            model's size), or texts (a string or a list/array of strings) for a
            text model.
        top_k: how many classes to rank per input.
        class_names: a name per class (or a file of them, one per line);
            default: from the run or the
            `labels.txt` beside the model, else `"0"`, `"1"`, ...
        batch_size: images or texts per model call.
        verbose: `"auto"` (a progress bar for files on a terminal), True or False.
        tta: test-time augmentation: average each image's outputs with those
            of its horizontally flipped copy (`tlkeras.tta.views`, the views
            of `tlkeras.tta.tta_model` and `evaluate(..., tta=True)`); image
            models of every kind.

    Returns:
        `Predictions`.

    Example:

    >>> import numpy as np, tlkeras
    >>> model = tlkeras.build_transfer_model(
    ...     "MobileNetV2", task="binary", input_shape=(32, 32, 3), weights=None)
    >>> result = tlkeras.predict(model, np.zeros((32, 32, 3)), class_names=["cat", "dog"])
    >>> result.probabilities.shape
    (1, 2)
    """
    if isinstance(model_or_run, Predictor):
        predictor = model_or_run
        if class_names is not None:
            predictor.set_class_names(class_names)
    else:
        predictor = Predictor(model_or_run, class_names)
    if tta and predictor.texts:
        raise ValueError(f"predict: tta=True averages flipped images, but {predictor.name!r} "
                         "takes texts; use tta=False.")
    batches, sources, kind, skipped, total = _batches(predictor, inputs, batch_size)
    show = (sys.stderr.isatty() and kind == "file") if verbose == "auto" else bool(verbose)

    def outputs_of(batch):
        if not tta:
            return predictor(batch)
        return np.mean([predictor(view) for view in tta_module.views(batch)], axis=0)

    outputs = [outputs_of(b) for b in tqdm(batches, desc="predict", unit="batch", total=total,
                                           disable=not show, file=sys.stderr)]
    probabilities = np.concatenate(outputs) if outputs else np.zeros((0, predictor.num_outputs))
    if probabilities.shape[-1] == 1:  # one sigmoid: P(class 1)
        probabilities = np.concatenate([1 - probabilities, probabilities], axis=-1)
    names = predictor.class_names
    top = np.argsort(-probabilities, axis=-1, kind="stable")[:, : min(top_k, len(names))]
    return Predictions(probabilities, top, names, sources, kind, skipped)


def _batches(predictor, inputs, batch_size):
    """(iterable of batches, per-input sources, input kind, skipped files, number of batches)."""
    def chunks(array):
        return [array[i:i + batch_size] for i in range(0, len(array), batch_size)]

    if predictor.texts:
        texts = text.as_strings([inputs] if isinstance(inputs, (str, bytes)) else inputs)
        validation.check_inputs(predictor, texts)
        texts = texts.numpy() if tf.is_tensor(texts) else np.asarray(texts)
        sources = [t.decode() if isinstance(t, bytes) else t for t in texts.tolist()]
        return chunks(texts), sources, "text", [], -(-len(texts) // batch_size)
    is_path = isinstance(inputs, (str, os.PathLike))
    if is_path or (isinstance(inputs, (list, tuple)) and inputs
                   and all(isinstance(p, (str, os.PathLike)) for p in inputs)):
        paths = [inputs] if is_path else list(inputs)
        if not any(_looks_like_path(p) for p in paths):
            validation.check_inputs(predictor, np.array(paths, dtype=object))  # text: refused
        if predictor.image_size is None:
            raise ValueError("predict: the model's input size is not fixed; pass arrays of pixels.")
        ds = data.from_files(paths, predictor.image_size, batch_size=batch_size)
        shown = _shown_paths(paths, ds.file_paths)
        batches = (b.numpy() for b in ds)
        return batches, shown, "file", list(ds.scan_report.bad), -(-len(shown) // batch_size)
    images = np.asarray(inputs)
    if images.ndim == 3 and images.dtype.kind not in "USO":
        images = images[None]
    validation.check_inputs(predictor, images, resize=True)
    images = images.astype("float32")
    if predictor.image_size and images.shape[1:3] != predictor.image_size:
        images = tf.image.resize(images, predictor.image_size).numpy()
    return chunks(images), list(range(len(images))), "index", [], -(-len(images) // batch_size)


def _looks_like_path(path):
    """Whether a string given to an image model names a file: it exists, has a folder part
    or an image extension (a missing file is then reported by name, not taken for text)."""
    path = os.fspath(path)
    return (os.path.exists(path) or os.sep in path
            or os.path.splitext(path)[1].lower() in data.IMAGE_EXTENSIONS)


def _shown_paths(given, used):
    """The usable files as the caller named them (relative to a folder they gave)."""
    shown = {}
    for path in given:
        path = os.fspath(path)
        if os.path.isdir(path):
            for root, _, files in os.walk(path, followlinks=True):
                for name in files:
                    full = os.path.join(root, name)
                    shown.setdefault(os.path.abspath(full), full)
        else:
            shown.setdefault(os.path.abspath(path), path)
    return [shown.get(p, p) for p in used]


def _read_labels(path, required=False):
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"No such class names file: {path!r}.")
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _names_in(folder):
    """Class names from a folder's labels.txt (exports, CLI runs) or config.json (fine_tune)."""
    names = _read_labels(os.path.join(folder, "labels.txt"))
    if names is None and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            names = json.load(f).get("class_names")
    return names


def _load_keras(path):
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:
        raise ValueError(f"predict: could not load {path!r}: {error}") from error
