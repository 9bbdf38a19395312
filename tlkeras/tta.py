"""Test-time augmentation: average a model's predictions over flipped copies of each image.

`tta_model(model)` builds a `keras.Model` that does it inside, from
deterministic layers only, so it saves to `.keras` (safe mode) and exports
like any other model. `tlkeras.evaluate(model, data, tta=True)` scores it and `tlkeras.predict(model,
inputs, tta=True)` predicts with it (any model kind `predict` takes: the views
are averaged outside exported models).

Example:

>>> import numpy as np, keras, tlkeras
>>> model = tlkeras.build_transfer_model("MobileNetV2", num_classes=3,
...                                      input_shape=(32, 32, 3), weights=None)
>>> tta = tlkeras.tta.tta_model(model)
>>> tta.predict(np.zeros((2, 32, 32, 3), "uint8"), verbose=0).shape
(2, 3)
"""

import keras
import numpy as np

__all__ = ["Flip", "tta_model", "views"]

_AXES = {"horizontal": -2, "vertical": -3}


@keras.saving.register_keras_serializable(package="tlkeras")
class Flip(keras.layers.Layer):
    """Flips images `(batch, height, width, channels)` every time (not randomly).

    `mode`: `"horizontal"` or `"vertical"`.
    """

    def __init__(self, mode="horizontal", **kwargs):
        super().__init__(**kwargs)
        if mode not in _AXES:
            raise ValueError(f"Expected mode in {tuple(_AXES)}, received mode={mode!r}.")
        self.mode = mode

    def call(self, images):
        return keras.ops.flip(images, axis=_AXES[self.mode])

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def tta_model(model, flips=("horizontal",)):
    """`model` (shared weights) averaging its outputs over the image and its `flips`.

    `flips`: any of `"horizontal"`, `"vertical"`; the original image always counts.
    Use horizontal flips only where a mirrored image keeps its class (not for text or digits).
    """
    inputs = keras.Input(shape=tuple(model.input_shape[1:]), name="image")
    outputs = [model(inputs)]
    outputs += [model(Flip(mode, name=f"tta_flip_{mode}")(inputs)) for mode in flips]
    if not flips:
        return keras.Model(inputs, outputs[0], name=f"{model.name}_tta")
    average = keras.layers.Average(name="tta_average", dtype="float32")(outputs)
    return keras.Model(inputs, average, name=f"{model.name}_tta")


def views(images, flips=("horizontal",)):
    """The batch `images` and its flipped copies (numpy), the views `tta_model` averages.

    >>> import numpy as np
    >>> [v[0, 0, :, 0].tolist() for v in views(np.arange(3.0).reshape(1, 1, 3, 1))]
    [[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]
    """
    images = np.asarray(images)
    return [images] + [np.ascontiguousarray(np.flip(images, axis=_AXES[mode])) for mode in flips]
