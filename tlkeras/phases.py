"""The training phases that `fine_tune` and `tune` share.

Phase 1 trains the head on the frozen base; phase 2 unfreezes the top of the
base and fine-tunes it with a small learning rate that follows ONE schedule
(`fine_tune_schedule`): a linear warm-up from 1% of the peak for
`warmup_epochs` epochs, but never more than a tenth of the phase, then cosine
decay to 1% of the peak. Both phases compile with `compile_for_task` (the
task's loss and metrics), and size themselves with `steps_per_epoch` and
`batch_size`.

Example:

>>> import numpy as np, tensorflow as tf
>>> from tlkeras import phases
>>> data = tf.data.Dataset.from_tensor_slices(
...     (np.zeros((40, 4), "float32"), np.zeros(40, "int32"))).batch(8)
>>> phases.steps_per_epoch(data), phases.batch_size(data)
(5, 8)
>>> schedule = phases.fine_tune_schedule(1e-3, steps_per_epoch=5, epochs=4)
>>> schedule.warmup_steps  # one epoch would be 5 steps: capped at a tenth of 20
2
"""

import keras
import tensorflow as tf

__all__ = ["batch_size", "compile_for_task", "fine_tune_schedule", "loss_and_metrics",
           "make_optimizer", "steps_per_epoch"]

WARMUP_FRACTION_MAX = 0.1  # the warm-up never takes more than this share of a phase
# Phase 2's default depth, in blocks (`fine_tune`, `lr_find`, `tlkeras train`): on the measured
# tasks the top two blocks beat the Keras guide in a fifth of its CPU time, while unfreezing the
# whole base costs 0.8-0.9x the guide's time for +0.02-0.07 accuracy (bench/RESULTS.md, issue 12).
UNFREEZE = 2


def fine_tune_schedule(learning_rate, steps_per_epoch, epochs, warmup_epochs=1):
    """The phase-2 learning-rate schedule (the one rule; see the module docstring).

    Args:
        learning_rate: the peak learning rate.
        steps_per_epoch: optimizer steps per epoch.
        epochs: epochs of the phase.
        warmup_epochs: warm-up length in epochs (at most a tenth of the phase).

    Returns:
        A `keras.optimizers.schedules.CosineDecay`.
    """
    total = max(int(steps_per_epoch) * int(epochs), 1)
    warmup = min(int(warmup_epochs * steps_per_epoch), int(total * WARMUP_FRACTION_MAX))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate / 100 if warmup else learning_rate,
        decay_steps=max(total - warmup, 1), alpha=0.01,
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup)


def compile_for_task(model, task, *, optimizer="adam", learning_rate=1e-3, label_smoothing=0.0,
                     metrics=None, jit_compile=False, steps_per_execution=1):
    """Compiles `model` with the task's loss and metrics; returns the optimizer.

    `learning_rate` may be a float or a schedule (e.g. `fine_tune_schedule`).

    >>> import keras
    >>> from tlkeras import phases
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    >>> type(phases.compile_for_task(model, "multiclass", learning_rate=1e-2)).__name__
    'Adam'
    """
    loss, metric_list = loss_and_metrics(task, label_smoothing, metrics)
    opt = make_optimizer(optimizer, learning_rate)
    model.compile(optimizer=opt, loss=loss, metrics=metric_list, jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    return opt


def make_optimizer(optimizer, learning_rate):
    """An optimizer by name (`"adam"`, `"adamw"`, `"sgd"`, `"rmsprop"`) or from a callable."""
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(learning_rate)
    makers = {
        "adam": lambda: keras.optimizers.Adam(learning_rate),
        "adamw": lambda: keras.optimizers.AdamW(learning_rate),
        "sgd": lambda: keras.optimizers.SGD(learning_rate, momentum=0.9),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate),
    }
    if optimizer not in makers:
        raise ValueError(
            f"Expected optimizer in {sorted(makers)} or a callable, received {optimizer!r}.")
    return makers[optimizer]()


def loss_and_metrics(task, label_smoothing=0.0, metrics=None):
    """The loss and default metrics for a task."""
    if task == "multiclass":
        if label_smoothing:
            loss = _SparseSmoothedCrossentropy(label_smoothing)
        else:
            loss = keras.losses.SparseCategoricalCrossentropy()
        default = ["accuracy"]
    elif task in ("binary", "multilabel"):
        loss = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        default = (["binary_accuracy"] if task == "binary"
                   else [keras.metrics.AUC(multi_label=True, name="auc")])
    else:
        loss, default = keras.losses.MeanSquaredError(), ["mae"]
    return loss, list(metrics) if metrics is not None else default


def batch_size(dataset):
    """The size of the first batch of `dataset`."""
    for x, *_ in dataset.take(1):
        return int(tf.shape(x)[0])
    raise ValueError("The training data is empty.")


def steps_per_epoch(dataset):
    """Batches in one pass over `dataset` (counted when its cardinality is unknown)."""
    n = int(dataset.cardinality())
    if n >= 0:
        return n
    return sum(1 for _ in dataset)


@keras.saving.register_keras_serializable(package="tlkeras")
class _SparseSmoothedCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing, on integer labels."""

    def __init__(self, label_smoothing=0.1, name="sparse_smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        depth = keras.ops.shape(y_pred)[-1]
        y_true = keras.ops.one_hot(
            keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), depth)
        return keras.losses.categorical_crossentropy(
            y_true, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
