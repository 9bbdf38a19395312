"""Serializable layers used inside tlkeras models (no `Lambda`, safe-mode loadable)."""

import keras
from keras import ops

_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

PREPROCESSING_MODES = ("tf", "torch", "caffe", "unit", "none")


@keras.saving.register_keras_serializable(package="tlkeras")
class ImagePreprocessing(keras.layers.Layer):
    """Maps raw RGB pixels in [0, 255] to what a pretrained base expects.

    Modes match `keras.applications.imagenet_utils.preprocess_input`:

    - `"tf"`: scale to [-1, 1] (Xception, Inception, MobileNet V1/V2, NASNet, ResNetV2).
    - `"torch"`: scale to [0, 1], then normalize with ImageNet mean/std (DenseNet).
    - `"caffe"`: RGB -> BGR, then subtract the ImageNet mean (ResNet, VGG).
    - `"unit"`: scale to [0, 1] (TF Hub image modules).
    - `"none"`: identity (EfficientNet, EfficientNetV2, ConvNeXt and MobileNetV3
      rescale inside the network; a user-built base gets its own preprocessing).

    The layer always computes in float32, whatever the dtype policy, so the
    first layer of the base receives exactly the values Keras' own function gives.

    Example:

    >>> import numpy as np
    >>> layer = ImagePreprocessing("tf")
    >>> float(layer(np.full((1, 2, 2, 3), 255.0))[0, 0, 0, 0])
    1.0
    """

    def __init__(self, mode="none", **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("name", "preprocessing")
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"ImagePreprocessing: expected mode in {PREPROCESSING_MODES}, "
                f"received mode={mode!r}."
            )
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN_RGB, "float32")
            std = ops.convert_to_tensor(_IMAGENET_STD_RGB, "float32")
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(_CAFFE_MEAN_BGR, "float32")
            return ops.flip(x, axis=-1) - mean
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="tlkeras")
class InferenceMode(keras.layers.Wrapper):
    """Runs the wrapped base in inference mode, always.

    Keras 3 functional models pass the outer `training` flag down to every
    layer, overriding a `base(x, training=False)` written when the model was
    built. This wrapper ignores the outer flag, so the base's BatchNormalization
    uses its moving statistics and its dropout stays off during `fit`, in both
    phases, also after unfreezing. `tlkeras.get_base(model)` returns the
    wrapped base.
    """

    def __init__(self, layer, **kwargs):
        kwargs.setdefault("name", f"{layer.name}_inference")
        super().__init__(layer, **kwargs)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        return self.layer(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return self.layer.compute_output_spec(inputs)
