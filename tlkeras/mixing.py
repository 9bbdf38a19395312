"""MixUp and CutMix for fine-tuning: Keras's own layers applied to labeled batches.

`keras.layers.MixUp` and `keras.layers.CutMix` blend two images and their
labels, so they need the labels, one-hot: they run in the `tf.data` pipeline
(never inside the model, so exported models stay deterministic), and the
loss becomes categorical cross-entropy on the resulting soft labels.
`tlkeras.fine_tune(..., mix="mixup")` uses them in phase 2.

Example:

>>> import numpy as np, tensorflow as tf
>>> from tlkeras import mixing
>>> ds = tf.data.Dataset.from_tensor_slices(
...     (np.random.randint(0, 255, (8, 16, 16, 3)).astype("uint8"), np.arange(8) % 4)).batch(4)
>>> images, labels = next(iter(mixing.mix_batches(ds, "mixup", num_classes=4, seed=1)))
>>> labels.shape, bool(np.allclose(labels.numpy().sum(-1), 1.0))
(TensorShape([4, 4]), True)
"""

import keras
import tensorflow as tf

__all__ = ["MIX_METHODS", "mix_batches"]

MIX_METHODS = ("mixup", "cutmix")


def mix_batches(dataset, method="mixup", *, num_classes, seed=None):
    """`dataset` of `(images, int labels)` batches, mixed: `(float32 images, soft one-hot labels)`.

    `method`: `"mixup"` (`keras.layers.MixUp(alpha=0.2)`) or `"cutmix"`
    (`keras.layers.CutMix()`). Extra elements (sample weights) pass through.
    """
    if method not in MIX_METHODS:
        raise ValueError(f"Expected mix in {MIX_METHODS} or None, received mix={method!r}.")
    layer = keras.layers.MixUp(seed=seed) if method == "mixup" else keras.layers.CutMix(seed=seed)

    def mix(images, labels, *rest):
        labels = _one_hot(labels, num_classes)
        out = layer({"images": tf.cast(images, "float32"), "labels": labels}, training=True)
        return (out["images"], out["labels"], *rest)

    return dataset.map(mix, num_parallel_calls=tf.data.AUTOTUNE)


def phase_data(train, val, loss, mix, task, num_classes, label_smoothing=0.0, seed=None):
    """Phase 2's `(train, val, loss)` with `mix` on (`fine_tune`'s `mix=`); unchanged when off.

    With `mix`, training batches are mixed, validation labels one-hot, and the
    loss categorical cross-entropy.
    """
    if mix is None:
        return train, val, loss
    if task != "multiclass":
        raise ValueError(f"mix={mix!r} needs a multiclass model (soft labels), received a {task} model.")

    return (mix_batches(train, mix, num_classes=num_classes, seed=seed),
            None if val is None else val.map(lambda x, y, *rest: (x, _one_hot(y, num_classes), *rest)),
            keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing))


def _one_hot(labels, num_classes):
    return tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), num_classes)
