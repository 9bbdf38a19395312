"""TensorBoard logging for transfer-learning runs.

`tensorboard_callbacks(log_dir, ...)` returns the callbacks `fine_tune` adds
to `fit`: Keras' `TensorBoard` (loss, metrics and learning rate per epoch,
optional profiling), a confusion-matrix image and a grid of sample validation
predictions per epoch, and the run's hyperparameters for the HParams
dashboard. Every summary is stepped by the epoch `fit` reports, so a second
`fit(..., initial_epoch=n)` (phase 2 of fine-tuning) continues the same axis.

Layout of `log_dir` (one TensorBoard "run" per folder):

    log_dir/train/       epoch_loss, epoch_<metric>, epoch_learning_rate, the
                         HParams session and its `hparams/<metric>` scalars
    log_dir/validation/  epoch_loss, epoch_<metric>
    log_dir/images/      confusion_matrix, sample_predictions, grad_cam

Point TensorBoard at the parent of several runs to compare them side by side
(HParams dashboard included; each run's trial id is its run folder's name,
the folder above `logs`, unless `trial_id` names it):

    tensorboard --logdir runs/

Example:

>>> import keras, numpy as np, tensorflow as tf, tlkeras
>>> images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
>>> val_ds = tf.data.Dataset.from_tensor_slices((images, np.arange(8) % 2)).batch(4)
>>> base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3)], name="tiny")
>>> model = tlkeras.build_transfer_model(base, 2)
>>> model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
>>> callbacks = tlkeras.callbacks.tensorboard_callbacks(
...     "runs/tiny/logs", validation_data=val_ds, class_names=["cat", "dog"],
...     num_images=4, hparams={"base": "tiny", "learning_rate": 1e-3})
>>> history = model.fit(val_ds, validation_data=val_ds, epochs=1, callbacks=callbacks,
...                     verbose=0)
>>> history = model.fit(val_ds, validation_data=val_ds, epochs=2, initial_epoch=1, verbose=0,
...                     callbacks=tlkeras.callbacks.tensorboard_callbacks("runs/tiny/logs"))
>>> sorted(os.listdir("runs/tiny/logs"))
['images', 'train', 'validation']
"""

import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from tlkeras import evaluation, plots
from tlkeras.explain import explain

IMAGES_DIR = "images"
HPARAMS_PREFIX = "hparams/"


def tensorboard_callbacks(
    log_dir,
    *,
    validation_data=None,
    class_names=None,
    hparams=None,
    trial_id=None,
    profile_batch=0,
    every_n_epochs=1,
    num_images=16,
    max_batches=None,
    **tensorboard_kwargs,
):
    """The TensorBoard callbacks of one training phase.

    Args:
        log_dir: the run's TensorBoard folder.
        validation_data: `(images, labels)` batches (a `tf.data.Dataset` or a
            tuple of arrays); enables the confusion matrix and sample grid.
        class_names: class names; defaults to `validation_data.class_names`.
        hparams: dict of hyperparameters for the HParams dashboard (values:
            bool, int, float or str; others are logged as `str(value)`),
            written with the train scalars so that each run is listed once.
        trial_id: the HParams trial id (default: the run folder's name, see
            `write_hparams`).
        profile_batch: batches to profile, e.g. `(10, 15)`; 0 disables it
            (`keras.callbacks.TensorBoard`). The trace goes to
            `log_dir/train/plugins/profile` (Profile tab; needs the
            `tensorboard-plugin-profile` package to view).
        every_n_epochs: log the confusion matrix and Grad-CAM overlays every n epochs.
        num_images: size of the sample prediction grid (0: no grid).
        max_batches: limit the confusion matrix to this many batches.
        **tensorboard_kwargs: more arguments of `keras.callbacks.TensorBoard`,
            e.g. `histogram_freq=1`, `update_freq="batch"`, `write_graph=False`.

    Returns:
        A list of `keras.callbacks.Callback`.
    """
    callbacks = [EpochTensorBoard(log_dir, profile_batch=profile_batch, hparams=hparams,
                                  trial_id=trial_id, **tensorboard_kwargs)]
    if validation_data is not None:
        callbacks += [
            ConfusionMatrixCallback(
                validation_data, class_names, log_dir, every_n_epochs, max_batches
            ),
            GradCAMCallback(validation_data, class_names, log_dir, every_n_epochs),
        ]
        if num_images:
            callbacks.insert(2, SamplePredictionsCallback(validation_data, class_names, log_dir,
                                                          num_images))
    return callbacks


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` whose validation scalars all use the epoch axis.

    Keras also logs `evaluation_<metric>_vs_iterations` stepped by the
    optimizer's iteration count, which restarts at 0 when phase 2 of
    fine-tuning compiles a new optimizer; those duplicates of the
    validation `epoch_<metric>` scalars are left out.

    With `hparams` it also records the run as an HParams session, with the
    epoch logs as `hparams/<name>` scalars, through its own train writer: no
    extra TensorBoard run, and one event file per folder.
    """

    def __init__(self, log_dir="logs", *, hparams=None, trial_id=None, **kwargs):
        super().__init__(log_dir, **kwargs)
        self.hparams, self.trial_id = hparams, trial_id

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.hparams is not None:
            _write_session(self._train_writer, self.log_dir, self.hparams, self.trial_id)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.hparams is not None:
            _write_scalars(self._train_writer, logs or {}, epoch)

    def on_test_end(self, logs=None):
        self._pop_writer()


class _ImageCallback(keras.callbacks.Callback):
    """Writes images into `log_dir/images`, through one writer per folder.

    (TensorBoard does not follow two event files growing in one folder.)
    """

    _writers = {}
    _skip_tasks = ()

    def __init__(self, validation_data, class_names, log_dir, task=None):
        super().__init__()
        self.validation_data = validation_data
        self.class_names = class_names
        self.log_dir = str(log_dir)
        self.task = task
        self._path = os.path.abspath(os.path.join(self.log_dir, IMAGES_DIR))

    def on_train_begin(self, logs=None):
        self._task = evaluation._task(self.model, self.task)
        self._enabled = self._task not in self._skip_tasks
        if not self._enabled:
            warnings.warn(f"{type(self).__name__} does nothing for task={self._task!r}.")
            return
        self._names = _class_names(self.class_names, self.validation_data, self.model, self._task)

    def on_train_end(self, logs=None):
        writer = self._writers.pop(self._path, None)
        if writer is not None:
            writer.close()

    def _write(self, tag, figure, step):
        if self._path not in self._writers:
            self._writers[self._path] = tf.summary.create_file_writer(self._path)
        image = tf.image.decode_png(evaluation.figure_to_png(figure), channels=3)
        with self._writers[self._path].as_default():
            tf.summary.image(tag, image[None], step=step)
        self._writers[self._path].flush()


class ConfusionMatrixCallback(_ImageCallback):
    """Logs a confusion-matrix image (`images/confusion_matrix`) every n epochs.

    For "multiclass" and "binary" (threshold 0.5) models; does nothing for
    other tasks.

    Args:
        validation_data: `(images, labels)` batches or a tuple of arrays.
        class_names: class names; defaults to `validation_data.class_names`.
        log_dir: the run's TensorBoard folder.
        every_n_epochs: log on epochs n, 2n, ... (1-based).
        max_batches: use at most this many validation batches.
        task: the model's task, read from its "predictions" layer if omitted.
    """

    _skip_tasks = ("multilabel", "regression")

    def __init__(
        self,
        validation_data,
        class_names=None,
        log_dir="logs",
        every_n_epochs=1,
        max_batches=None,
        task=None,
    ):
        super().__init__(validation_data, class_names, log_dir, task)
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches

    def on_epoch_end(self, epoch, logs=None):
        if not self._enabled or (epoch + 1) % self.every_n_epochs:
            return
        labels, probabilities = evaluation.collect_predictions(
            self.model, self.validation_data, max_batches=self.max_batches
        )
        labels, predicted = _classes(self._task, labels, probabilities)
        cm = evaluation.confusion_matrix(labels, predicted, len(self._names))
        title = f"Confusion matrix, epoch {epoch + 1} (accuracy {np.mean(labels == predicted):.3f})"
        self._write(
            "confusion_matrix", evaluation.plot_confusion_matrix(cm, self._names, title), epoch
        )


class SamplePredictionsCallback(_ImageCallback):
    """Logs a grid of validation images with true and predicted labels.

    The same first `num_images` validation images every epoch (green title:
    right, red: wrong), as `images/sample_predictions`.
    """

    def __init__(self, validation_data, class_names=None, log_dir="logs", num_images=16, task=None):
        super().__init__(validation_data, class_names, log_dir, task)
        self.num_images = num_images
        self._samples = None

    def on_epoch_end(self, epoch, logs=None):
        if not self._enabled:
            return
        if self._samples is None:
            self._samples = evaluation.first_samples(self.validation_data, self.num_images)
        images, labels = self._samples
        probabilities = np.asarray(self.model.predict_on_batch(images), dtype="float32")
        self._write("sample_predictions", self._plot(images, labels, probabilities, epoch), epoch)

    def _plot(self, images, labels, probabilities, epoch):
        cols = int(np.ceil(np.sqrt(len(images))))
        rows = int(np.ceil(len(images) / cols))
        figure = plots._figure(2.2 * cols, 2.4 * rows)
        figure.suptitle(f"Validation samples, epoch {epoch + 1}")
        for i, (image, label, p) in enumerate(zip(images, labels, probabilities)):
            text, right = _describe(self._task, label, p, self._names)
            ax = figure.add_subplot(rows, cols, i + 1)
            ax.imshow(np.clip(image, 0, 255).astype("uint8"))
            ax.set_title(text, fontsize=8, color="green" if right else "red")
            ax.axis("off")
        figure.tight_layout()
        return figure


class GradCAMCallback(_ImageCallback):
    """Logs Grad-CAM overlays of a fixed set of validation images (`images/grad_cam`).

    The first `num_images` validation images, each with the heatmap of its
    predicted class (`tlkeras.explain`), every n epochs. Image classifiers only;
    for a model Grad-CAM cannot see into it warns once and stops.
    """

    _skip_tasks = ("multilabel", "regression")

    def __init__(self, validation_data, class_names=None, log_dir="logs", every_n_epochs=1,
                 num_images=8, task=None):
        super().__init__(validation_data, class_names, log_dir, task)
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self._samples = None

    def on_epoch_end(self, epoch, logs=None):
        if not self._enabled or (epoch + 1) % self.every_n_epochs:
            return
        if self._samples is None:
            self._samples = evaluation.first_samples(self.validation_data, self.num_images)[0]
        if np.ndim(self._samples) != 4:  # not images (e.g. text): nothing to overlay
            self._enabled = False
            return
        try:
            result = explain(self.model, self._samples)
        except (ValueError, TypeError) as error:
            warnings.warn(f"GradCAMCallback: no Grad-CAM images: {error}")
            self._enabled = False
            return
        cols = int(np.ceil(np.sqrt(len(self._samples))))
        rows = int(np.ceil(len(self._samples) / cols))
        figure = plots._figure(2.2 * cols, 2.4 * rows)
        figure.suptitle(f"Grad-CAM of the predicted class, epoch {epoch + 1}")
        for i, (image, c, p) in enumerate(zip(result.overlay(), result.predicted,
                                              result.probabilities)):
            ax = figure.add_subplot(rows, cols, i + 1)
            ax.imshow(image)
            score = p[c] if len(p) > 1 else (p[0] if c == 1 else 1 - p[0])
            ax.set_title(f"{self._names[c]} ({score:.2f})", fontsize=8)
            ax.axis("off")
        figure.tight_layout()
        self._write("grad_cam", figure, epoch)


class HParamsCallback(keras.callbacks.Callback):
    """Writes the run's hyperparameters and metrics for the HParams dashboard.

    At the start of training it writes the HParams session (`write_hparams`);
    after each epoch it writes the epoch logs (`loss`, `val_accuracy`, ...,
    or only `metrics`) as `hparams/<name>` scalars into the same run folder,
    so the dashboard shows metric columns whichever folder TensorBoard is
    pointed at.
    """

    def __init__(self, hparams, log_dir, metrics=None, trial_id=None):
        super().__init__()
        self.hparams = dict(hparams)
        self.log_dir = str(log_dir)
        self.metrics = metrics
        self.trial_id = trial_id
        self._writer = None

    def on_train_begin(self, logs=None):
        self._writer = write_hparams(
            self.log_dir, self.hparams, trial_id=self.trial_id, close=False
        )

    def on_epoch_end(self, epoch, logs=None):
        names = self.metrics if self.metrics is not None else list(logs or {})
        values = {name: logs[name] for name in names if name in (logs or {})}
        _write_scalars(self._writer, values, epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def write_hparams(log_dir, hparams, metrics=None, *, trial_id=None, step=0, close=True):
    """Records `log_dir` as one session of the HParams dashboard.

    Writes the session's hyperparameters (`hp.hparams`) into `log_dir`, and
    optionally final metric values as `hparams/<name>` scalars. No experiment
    config (`hp.hparams_config`) is written: TensorBoard then builds it from
    all sessions under its `--logdir`, so runs with different hyperparameter
    sets still compare side by side.

    Args:
        log_dir: the run's TensorBoard folder.
        hparams: `{name: value}` (values: bool, int, float or str; others
            are written as `str(value)`).
        metrics: optional `{name: value}` to write at `step`.
        trial_id: the session's name; defaults to the run folder's name
            (`log_dir`'s, or the folder above it when `log_dir` is `logs`,
            `logs/train`...), readable and the same on every machine.

    Returns:
        The summary writer (already closed if `close`).

    Example:

    >>> writer = write_hparams("runs/a/logs", {"lr": 1e-3, "base": "ResNet50"},
    ...                        {"val_accuracy": 0.91})
    >>> os.listdir("runs/a/logs")
    ['events.out.tfevents...']
    """
    writer = tf.summary.create_file_writer(str(log_dir))
    _write_session(writer, log_dir, hparams, trial_id)
    _write_scalars(writer, metrics or {}, step)
    if close:
        writer.close()
    return writer


def _write_session(writer, log_dir, hparams, trial_id):
    from tensorboard.plugins.hparams import api as hp

    values = {}
    for name, value in dict(hparams).items():
        if isinstance(value, np.generic):
            value = value.item()
        values[str(name)] = value if isinstance(value, (bool, int, float, str)) else str(value)
    with writer.as_default():
        hp.hparams(values, trial_id=trial_id or _run_name(log_dir))
    writer.flush()


def _run_name(log_dir):
    """The run folder's name: `log_dir`'s, skipping the `logs`, `train`, ... folders in it."""
    path = os.path.abspath(log_dir)
    while os.path.basename(path) in ("logs", "train", "validation"):
        path = os.path.dirname(path)
    return os.path.basename(path) or path


def _write_scalars(writer, values, step):
    with writer.as_default():
        for name, value in values.items():
            tf.summary.scalar(HPARAMS_PREFIX + name, float(value), step=step)
    writer.flush()


def _class_names(class_names, data, model, task):
    names = class_names if class_names is not None else getattr(data, "class_names", None)
    if task == "regression":
        return None
    width = 2 if task == "binary" else model.output_shape[-1]
    names = [str(n) for n in names] if names is not None else [str(i) for i in range(width)]
    if len(names) != width:
        raise ValueError(
            f"class_names has {len(names)} names but the {task} model has {width} classes."
        )
    return names


def _classes(task, labels, probabilities):
    n = len(labels)
    if task == "binary":
        return np.rint(labels.reshape(n)).astype(int), (
            probabilities.reshape(n) >= evaluation.THRESHOLD
        ).astype(int)
    labels = labels if labels.ndim == 1 else np.argmax(labels.reshape(n, -1), axis=1)
    return labels.astype(int), np.argmax(probabilities, axis=1)


def _describe(task, label, p, names):
    """A sample's title `true -> predicted` and whether it is right."""
    if task == "regression":
        label, p = np.ravel(label), np.ravel(p)
        return f"true {_fmt(label)}\npred {_fmt(p)}", bool(
            np.allclose(label, p, rtol=0.1, atol=1e-3)
        )
    if task == "multilabel":
        true = [n for n, v in zip(names, np.ravel(label)) if v >= 0.5]
        pred = [n for n, v in zip(names, p) if v >= evaluation.THRESHOLD]
        return f"true {','.join(true) or '-'}\npred {','.join(pred) or '-'}", true == pred
    (label,), (pred,) = _classes(task, np.asarray([label]), p[None])
    confidence = p[pred] if task == "multiclass" else (p[0] if pred else 1 - p[0])
    return f"true {names[label]}\npred {names[pred]} ({confidence:.2f})", label == pred


def _fmt(values):
    return ", ".join(f"{v:.3g}" for v in values)
