"""Where a model meets data: one set of checks before anything trains, evaluates or tunes.

`check_model_data(model, data)` turns arrays or `(x, y)` tuples into a
dataset (as Keras `fit` accepts them) and refuses, in one line naming the
argument and position, data that would crash inside TensorFlow or train
into a silently wrong model: text for an image model (or the reverse),
images of another size, one-hot or fractional labels where class ids are
expected, labels out of range for the model's classes, more classes than
the model has, and NaN or infinite pixels or labels.

Example:

>>> import keras, numpy as np
>>> from tlkeras import validation
>>> inputs = keras.Input((8, 8, 3))
>>> outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(
...     keras.layers.Flatten()(inputs))
>>> model = keras.Model(inputs, outputs)
>>> x, y = np.zeros((4, 8, 8, 3), "float32"), np.array([0, 1, 2, 1])
>>> try:
...     validation.check_model_data(model, (x, y))
... except ValueError as error:
...     print(str(error).split(" is ")[0])
train_data: label 2 (sample 2 of the first batch)
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tlkeras import anatomy

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "check_inputs", "check_model_data",
           "check_positive", "check_search_space", "class_index_map", "remap_labels"]

_ARRAY_BATCH = 32  # Keras fit's default batch size for arrays


def check_model_data(model, data, *, task=None, name="train_data", labeled=True):
    """Checks that `model` can learn from (or be evaluated on) `data`; returns it as a dataset.

    Args:
        model: a Keras model (its task is read from its "predictions" layer).
        data: a `tf.data.Dataset` of `(inputs, labels)` batches, a tuple
            `(x, y)` of arrays (batched by 32, as Keras `fit` does), or `x` alone
            when `labeled=False`.
        task: overrides the task read from the model.
        name: the argument's name in messages.
        labeled: whether labels are required.

    Returns:
        A `tf.data.Dataset` (`data` itself when it was one).

    Raises:
        ValueError / TypeError: one line naming `name`, what was expected,
            what was received and what to do.
    """
    task = task or anatomy.infer_task(model)
    data = _as_dataset(data, name, labeled)
    spec = data.element_spec
    x_spec = spec[0] if isinstance(spec, tuple) else spec
    if labeled and not (isinstance(spec, tuple) and len(spec) >= 2):
        raise ValueError(f"{name}: expected batches of (inputs, labels), received batches of "
                         f"{_describe(spec)}. Pass labeled data, e.g. from tlkeras.data.")
    _check_inputs_kind(model, x_spec, name)
    batch = next(iter(data.take(1)), None)
    if batch is None:
        raise ValueError(f"{name}: the dataset is empty; expected at least one batch.")
    x = batch[0] if isinstance(batch, tuple) else batch
    if x.dtype != tf.string:
        _check_image_size(model, x.shape, name)
        _check_finite(x.numpy(), name, "pixel", "of the first batch")
    if labeled:
        y = np.asarray(batch[1])
        class_names = getattr(data, "class_names", None)
        _check_labels(model, task, y, name, "of the first batch", class_names)
        labels = getattr(data, "labels", None)  # all labels, when the dataset records them
        if labels is not None and np.asarray(labels).shape[1:] == y.shape[1:]:
            _check_labels(model, task, np.asarray(labels), name, "", class_names)
    return data


def _as_dataset(data, name, labeled):
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        arrays = [np.asarray(a) for a in data]
        if len({len(a) for a in arrays}) != 1:
            raise ValueError(f"{name}: x and y must have the same number of samples, received "
                             f"{[len(a) for a in arrays]}.")
        for label, array in zip(("pixel", "label"), arrays[:2]):
            if array.dtype.kind in "fiub":
                _check_finite(array, name, label, "")
        return tf.data.Dataset.from_tensor_slices(tuple(arrays)).batch(_ARRAY_BATCH)
    if not labeled and hasattr(data, "shape"):
        return tf.data.Dataset.from_tensor_slices(np.asarray(data)).batch(_ARRAY_BATCH)
    raise TypeError(f"{name}: expected a tf.data.Dataset of (inputs, labels) batches or a tuple "
                    f"(x, y) of arrays, received {type(data).__name__}.")


def _describe(spec):
    return getattr(spec, "dtype", None) and f"{spec.dtype.name} {spec.shape}" or str(spec)


def check_inputs(model, x, *, name="inputs", resize=False):
    """Checks inputs without labels (e.g. to predict) for `model`: text for an image model (or
    the reverse), the input shape, and that every pixel is finite.

    Args:
        model: a Keras model, or any object with `name`, `input_shape` and `texts`
            (whether it takes strings), such as a `tlkeras.Predictor`.
        x: an array (or tensor) of images, or of strings.
        name: the argument's name in messages.
        resize: heights and widths may differ from the model's (the caller resizes them).

    Raises:
        ValueError: one line naming `name`, what was expected, what was received and what
            to do.

    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten()])
    >>> try:
    ...     check_inputs(model, np.zeros((2, 8, 8, 1)), resize=True)
    ... except ValueError as error:
    ...     print(str(error).split(", received")[0])
    inputs: the model 'sequential' takes images of shape (8, 8, 3)
    """
    x = x.numpy() if tf.is_tensor(x) else np.asarray(x)
    text = x.dtype.kind in "USO" or x.dtype == object
    _check_inputs_kind(model, tf.TensorSpec(x.shape, tf.string if text else x.dtype), name)
    if text:
        return
    shape = x.shape
    expected = _signature(model)[1]
    if resize and len(shape) == 4 and expected and len(expected) == 4:
        shape = (shape[0], *expected[1:3], shape[3])
    _check_image_size(model, shape, name)
    _check_finite(x, name, "pixel", "")


def _signature(model):
    """(name, input shape, whether it takes strings) of a Keras model or a `Predictor`."""
    if isinstance(model, keras.Model):
        return model.name, model.input_shape, model.inputs[0].dtype == "string"
    return model.name, model.input_shape, model.texts


def _check_inputs_kind(model, x_spec, name):
    model_name, input_shape, model_text = _signature(model)
    data_text = getattr(x_spec, "dtype", None) == tf.string
    if model_text and not data_text:
        raise ValueError(f"{name}: the model {model_name!r} takes text (strings), received "
                         f"{_describe(x_spec)}. Use a text model for images, or text data "
                         "(tlkeras.data.from_text_directory).")
    if data_text and not model_text:
        raise ValueError(f"{name}: the model {model_name!r} takes images {input_shape}, "
                         "received text (strings). Use a text model (tlkeras.text) for text.")


def _check_image_size(model, shape, name):
    model_name, input_shape, _ = _signature(model)
    expected = tuple(input_shape[1:]) if isinstance(input_shape, tuple) else None
    received = tuple(shape[1:])
    if not expected or len(expected) != len(received):
        if expected:
            raise ValueError(f"{name}: the model takes inputs of shape (batch, *{expected}), "
                             f"received batches of shape {tuple(shape)}.")
        return
    if any(e is not None and e != r for e, r in zip(expected, received)):
        what = "images" if len(expected) == 3 else "inputs"
        hint = (f" Load the data with image_size={expected[:2]}, or build the model with "
                f"input_shape={received}." if len(expected) == 3 else "")
        raise ValueError(f"{name}: the model {model_name!r} takes {what} of shape {expected}, "
                         f"received {what} of shape {received}.{hint}")


def _check_finite(array, name, what, where):
    if array.dtype.kind != "f":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}: {what} values must be finite; sample {position[0]}"
            f"{' ' + where if where else ''}"
            f" has {array[position]} at position {position} ({int(bad.sum())} such values). Fix or "
            "drop those samples.")


def _check_labels(model, task, y, name, where, class_names):
    outputs = model.output_shape[-1] if isinstance(model.output_shape, tuple) else None
    _check_finite(y, name, "label", where)
    if task == "regression":
        return
    num_classes = 2 if task == "binary" else outputs
    if class_names is not None and num_classes and len(class_names) > num_classes:
        raise ValueError(
            f"{name}: the data has {len(class_names)} classes {list(class_names)}, but the model "
            f"{model.name!r} predicts {num_classes} ({task}). Build the model with "
            f"num_classes={len(class_names)}.")
    if task == "multilabel":
        if y.ndim != 2 or y.shape[-1] != outputs or not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name}: task 'multilabel' takes multi-hot labels of shape (N, "
                             f"{outputs}) of 0 and 1, received shape {y.shape}.")
        return
    if y.ndim == 2 and y.shape[-1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"{name}: task {task!r} takes one integer class id per sample, received labels of "
            "shape "
            f"{y.shape}" + (" (one-hot, e.g. label_mode='categorical'). Load the data with "
                            "label_mode='int', or pass np.argmax(y, axis=-1)."
                            if y.ndim == 2 else ".") )
    fractional = np.flatnonzero(y != np.round(y))
    if len(fractional):
        i = fractional[0]
        raise ValueError(f"{name}: task {task!r} takes integer class ids, received label {y[i]} "
                         f"(sample {i}{' ' + where if where else ''}). For soft or numeric targets "
                         "build a regression model (task='regression').")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if len(bad):
        i = bad[0]
        if task == "binary":
            raise ValueError(
                f"{name}: task 'binary' takes labels 0 and 1, received label {y[i]:g} (sample "
                f"{i}{' ' + where if where else ''}): the data has {int(y.max()) + 1} classes. "
                f"Build the model with num_classes={int(y.max()) + 1}.")
        raise ValueError(
            f"{name}: label {y[i]:g} (sample {i}{' ' + where if where else ''}) is out of range "
            f"for the model {model.name!r}, which predicts {num_classes} classes (0 to "
            f"{num_classes - 1}). Build the model with num_classes={int(y.max()) + 1}, or fix the "
            "labels.")


def check_positive(**values):
    """Raises `ValueError` naming the argument unless each value is a finite number > 0.

    >>> check_positive(learning_rate=1e-3)
    """
    for key, value in values.items():
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"Expected {key} to be a finite number > 0, received {key}={value!r}.")


_SPACE_RULES = {
    "fine_tune_learning_rate": ("a finite number > 0",
                                lambda v: _number(v) and 0 < v < math.inf),
    "learning_rate": ("a finite number > 0", lambda v: _number(v) and 0 < v < math.inf),  # old name
    "dropout": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "label_smoothing": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
    "head_units": ("an int >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool)
                   and v >= 0),
}


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_search_space(search_space, optimizers=("adam", "adamw", "sgd", "rmsprop")):
    """Checks the literal values of a `tlkeras.tune` search space, naming the key and value.

    >>> check_search_space({"fine_tune_learning_rate": [1e-3, 1e-4], "optimizer": ["adam"]})
    """
    if not isinstance(search_space, dict):
        return  # None (the default space) or a callable: checked per trial
    for key, spec in search_space.items():
        if callable(spec):
            continue
        values = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        if isinstance(spec, (list, tuple)) and not values:
            raise ValueError(f"search_space[{key!r}]: expected at least one value, received [].")
        for value in values:
            if key == "optimizer":
                ok, expected = value in optimizers or callable(value), f"one of {list(optimizers)}"
            elif key in _SPACE_RULES:
                expected, rule = _SPACE_RULES[key]
                ok = rule(value)
            else:
                continue
            if not ok:
                raise ValueError(f"search_space[{key!r}]: expected {expected}, received "
                                 f"{value!r}.")


def class_index_map(data_names, model_names, name="data"):
    """Index of each of the data's classes among the model's, matched by name.

    >>> class_index_map(["dog", "cat"], ["cat", "dog", "fox"])
    [1, 0]
    """
    data_names, model_names = [str(c) for c in data_names], [str(c) for c in model_names]
    unknown = [c for c in data_names if c not in model_names]
    if unknown:
        raise ValueError(f"{name}: classes {unknown} are not among the model's classes "
                         f"{model_names}. Evaluate on data of the model's classes, or pass the "
                         "model's class names (e.g. from the run's labels.txt).")
    return [model_names.index(c) for c in data_names]


def remap_labels(y, data_names, model_names, task="multiclass", name="data"):
    """Labels numbered by `data_names` renumbered by `model_names`, matched by name.

    A class of the data that the model does not know is an error; data holding
    only some of the model's classes is fine (logged as a subset).

    >>> remap_labels(np.array([0, 1, 1]), ["dog", "cat"], ["cat", "dog", "fox"]).tolist()
    [1, 0, 0]
    """
    import logging

    index = np.asarray(class_index_map(data_names, model_names, name))
    if len(index) < len(model_names):
        logging.getLogger("tlkeras").warning(
            "%s holds %d of the model's %d classes (%s); the report covers that subset.", name,
            len(index), len(model_names), ", ".join(str(c) for c in data_names))
    y = np.asarray(y)
    if task == "multiclass" and (y.ndim == 1 or y.shape[-1] == 1):
        return index[np.rint(y.reshape(-1)).astype(int)]
    if task == "binary":
        flat = np.rint(y.reshape(-1)).astype(int)
        return index[flat].astype(y.dtype)
    out = np.zeros((len(y), len(model_names)), y.dtype)  # one-hot or multi-hot columns
    out[:, index] = y.reshape(len(y), -1)
    return out


class NonFiniteLossError(FloatingPointError):
    """The training loss (or the weights) became NaN or infinite."""


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops at a NaN/inf loss, puts back the last good weights, raises `NonFiniteLossError`.

    Like `keras.callbacks.TerminateOnNaN`, but what is left is usable: the
    weights of the last epoch that ended with a finite loss (or those at the
    start of training), and nothing saved from the bad state.

    Args:
        folder: the run folder, named in the message (or None).
    """

    def __init__(self, folder=None):
        super().__init__()
        self.folder = folder
        self._good = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self._good = [v.numpy() for v in self.model.weights]

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        # The loss is measured before the last update: the weights themselves are checked too.
        weights = [v.numpy() for v in self.model.weights]
        if all(np.isfinite(w).all() for w in weights if w.dtype.kind == "f"):
            self._good = weights
        else:
            self._stop("non-finite weights", epoch, None)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or _finite(loss):
            return
        self._stop(f"the loss became {float(loss)}", self._epoch, batch)

    def _stop(self, what, epoch, batch):
        self.model.stop_training = True
        for variable, value in zip(self.model.weights, self._good or []):
            variable.assign(value)
        kept = (f" The run folder {self.folder} keeps its last good checkpoint "
                "(checkpoints/best.weights.h5) and no model from the bad state." if self.folder
                else "")
        at = f"epoch {epoch + 1}" + (f", batch {batch + 1}" if batch is not None else " (its end)")
        raise NonFiniteLossError(
            f"Training stopped: {what} at {at}. The model's weights were put back to the last "
            "epoch with a finite "
            f"loss.{kept} Lower the learning rate, or check the data for extreme values.")


def _finite(value):
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True
