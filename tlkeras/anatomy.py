"""Model anatomy: the layer layout of a tlkeras transfer model, and the one head builder.

Every transfer model tlkeras builds is a functional `keras.Model` laid out as

    input ("image" pixels in [0, 255], or "text" strings)
      -> "augmentation" (optional; random layers, active only in training)
      -> "preprocessing" (the architecture's own)
      -> the base, wrapped in `InferenceMode` by `in_inference_mode` (the rule below)
      -> "features" (pooling: the feature vector)
      -> "head_dropout_<i>", "head_dense_<i>", ... "head_dropout" -> "predictions" (float32)

THE inference-mode rule, for every kind of base (a `keras.applications`
name, your own `keras.Model`, a TF Hub SavedModel, a KerasHub image or text
backbone): the base always runs in inference mode, also inside `fit` and
after unfreezing, so its BatchNormalization keeps its moving statistics and
its dropout stays off; only the head's dropout acts in training. Keras 3
`fit` passes `training=True` to every layer, overriding a
`base(x, training=False)` written at build time, so the rule is applied
by wrapping (`in_inference_mode`), in this one place.

This module is the only reader of those names: everything else asks it
(`get_base`, `get_head`, `head_config`, `split_model`, `feature_extractor`,
`has_augmentation`, ...). `build_head` builds every head (used by
`build_transfer_model`, `tune` and `rebuild_head`).

Example:

>>> import keras
>>> from tlkeras import anatomy
>>> features = keras.Input((8,), name="features")
>>> outputs = anatomy.build_head(features, 3, "softmax", hidden_units=(4,), dropout=0.1)
>>> model = keras.Model(features, outputs)
>>> [layer.name for layer in model.layers[1:]]
['head_dropout_0', 'head_dense_0', 'head_dropout', 'predictions']
"""

import keras

from tlkeras import data
from tlkeras.layers import ImagePreprocessing, InferenceMode

__all__ = [
    "AUGMENTATION", "FEATURES", "PREDICTIONS", "PREPROCESSING", "TASKS", "augmentation_layer",
    "build_head", "feature_extractor", "get_augmentation", "get_base", "get_head",
    "get_preprocessing", "has_augmentation",
    "head_config", "image_features", "in_inference_mode", "infer_task", "is_transfer_model",
    "output_units", "pooling_layer", "rebuild_head", "split_model", "without_augmentation",
]

AUGMENTATION = "augmentation"
PREPROCESSING = "preprocessing"
FEATURES = "features"
PREDICTIONS = "predictions"
_HEAD_PREFIX = "head_"
FLOAT32_LAYERS = (PREPROCESSING, PREDICTIONS)  # stay float32 under mixed precision
TASKS = ("multiclass", "binary", "multilabel", "regression")


def in_inference_mode(base):
    """`base` wrapped so that it always runs in inference mode (the rule above)."""
    return InferenceMode(base)


def output_units(task, num_classes):
    """`(units, activation)` of the "predictions" layer for `task`.

    >>> output_units("binary", None)
    (1, 'sigmoid')
    """
    if task not in TASKS:
        raise ValueError(f"Expected task in {TASKS}, received task={task!r}.")
    if task == "binary":
        if num_classes not in (None, 1, 2):
            raise ValueError(
                f"task='binary' has one sigmoid output; received num_classes={num_classes}.")
        return 1, "sigmoid"
    if task == "regression":
        return num_classes or 1, "linear"
    minimum = 2 if task == "multiclass" else 1
    if not isinstance(num_classes, int) or num_classes < minimum:
        raise ValueError(
            f"task={task!r} needs num_classes >= {minimum}, received num_classes={num_classes!r}."
        )
    return num_classes, "softmax" if task == "multiclass" else "sigmoid"


def build_head(features, units, activation, *, dropout=0.2, hidden_units=(),
               kernel_regularizer=None):
    """The head on a feature tensor: returns the "predictions" tensor (float32).

    Each hidden `Dense(relu)` layer and the output layer is preceded by
    dropout (when `dropout > 0`); `kernel_regularizer` applies to every Dense
    kernel of the head.
    """
    x = features
    for i, width in enumerate(hidden_units):
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"{_HEAD_PREFIX}dropout_{i}")(x)
        x = keras.layers.Dense(int(width), activation="relu",
                               kernel_regularizer=_fresh(kernel_regularizer),
                               name=f"{_HEAD_PREFIX}dense_{i}")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{_HEAD_PREFIX}dropout")(x)
    return keras.layers.Dense(units, activation=activation, dtype="float32",
                              kernel_regularizer=_fresh(kernel_regularizer), name=PREDICTIONS)(x)


def head_config(model):
    """The arguments of `build_head` that rebuild `model`'s head.

    A dict with `units`, `activation`, `dropout`, `hidden_units` and
    `kernel_regularizer` (a fresh regularizer object, or None).

    >>> import keras
    >>> from tlkeras import anatomy
    >>> f = keras.Input((8,), name="features")
    >>> m = keras.Model(f, anatomy.build_head(f, 2, "softmax", hidden_units=(4,),
    ...                                       kernel_regularizer="l2"))
    >>> config = anatomy.head_config(m)
    >>> config["hidden_units"], config["dropout"], type(config["kernel_regularizer"]).__name__
    ((4,), 0.2, 'L2')
    """
    predictions = _layer(model, PREDICTIONS)
    head = get_head(model)
    dropouts = [layer.rate for layer in head if isinstance(layer, keras.layers.Dropout)]
    return {
        "units": predictions.units,
        "activation": keras.activations.serialize(predictions.activation),
        "dropout": dropouts[0] if dropouts else 0.0,
        "hidden_units": tuple(layer.units for layer in head
                              if layer.name.startswith(f"{_HEAD_PREFIX}dense_")),
        "kernel_regularizer": _fresh(predictions.kernel_regularizer),
    }


def rebuild_head(model, **changes):
    """A model sharing `model`'s input-to-"features" layers with a new head.

    The new head is `head_config(model)` with `changes` applied (e.g.
    `dropout=0.3`, `hidden_units=(64,)`); its weights are freshly initialized.
    """
    config = {**head_config(model), **changes}
    activation = config.pop("activation")
    units = config.pop("units")
    if isinstance(activation, dict):
        activation = keras.activations.deserialize(activation)
    outputs = build_head(_layer(model, FEATURES).output, units, activation, **config)
    return keras.Model(model.inputs, outputs, name=model.name)


def is_transfer_model(model):
    """Whether `model` has the tlkeras layout ("features" and "predictions" layers)."""
    if not isinstance(model, keras.Model):
        return False
    names = {layer.name for layer in model.layers}
    return {FEATURES, PREDICTIONS} <= names


def infer_task(model):
    """The task of a built model, read from its "predictions" layer."""
    layer = _layer(model, PREDICTIONS)
    activation = keras.activations.serialize(layer.activation)
    activation = activation if isinstance(activation, str) else activation.get("config", activation)
    if activation == "softmax":
        return "multiclass"
    if activation == "sigmoid":
        return "binary" if layer.units == 1 else "multilabel"
    return "regression"


def get_base(model):
    """The pretrained base inside a model built by `build_transfer_model`."""
    features = _layer(model, FEATURES)
    base = features._inbound_nodes[0].input_tensors[0]._keras_history.operation
    return base.layer if isinstance(base, InferenceMode) else base


def get_preprocessing(model):
    """The model's "preprocessing" layer (the architecture's own), or None."""
    return next((layer for layer in model.layers if layer.name == PREPROCESSING), None)


def get_head(model):
    """The head's layers: every layer after "features", in order (ends with "predictions")."""
    features = _layer(model, FEATURES)
    return model.layers[model.layers.index(features) + 1:]


def get_augmentation(model):
    """The model's "augmentation" layer, or None."""
    return next((layer for layer in model.layers if layer.name == AUGMENTATION), None)


def has_augmentation(model):
    """Whether the model holds an "augmentation" layer (random in training)."""
    return get_augmentation(model) is not None


def feature_extractor(model):
    """The input-to-"features" part of `model`, as a model sharing its layers."""
    features = _layer(model, FEATURES)
    return keras.Model(model.inputs, features.output, name=f"{model.name}_features")


def split_model(model):
    """Splits a transfer model into `(feature_extractor, head)`.

    `feature_extractor` maps images to the "features" vector; `head` maps
    features to predictions. Both share the layers (and weights) of `model`,
    so training `head` trains `model`'s head.
    """
    extractor = feature_extractor(model)
    features = _layer(model, FEATURES)
    head_input = keras.Input(shape=tuple(features.output.shape[1:]), name=FEATURES)
    x = head_input  # layers of a functional model are in graph order: the head is a chain
    for layer in get_head(model):
        x = layer(x)
    return extractor, keras.Model(head_input, x, name=f"{model.name}_head")


def without_augmentation(model):
    """The same model (shared layers and weights) without its "augmentation" layer.

    Augmentation is a no-op at inference; dropping it keeps its random ops out of
    exported graphs (TFLite cannot convert them). Returns `model` if it has none.
    """
    if not has_augmentation(model):
        return model
    inputs = keras.Input(shape=tuple(model.input_shape[1:]), name=model.inputs[0].name)
    x = inputs
    for layer in model.layers[1:]:  # a tlkeras image model is a chain of layers
        if layer.name != AUGMENTATION:
            x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def augmentation_layer(augmentation):
    """The model's "augmentation" layer from a preset name, a layer or a list of layers."""
    if isinstance(augmentation, str):
        return data.augmentation_preset(augmentation, name=AUGMENTATION)
    layers = list(augmentation) if isinstance(augmentation, (list, tuple)) else [augmentation]
    for layer in layers:
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                "augmentation: expected a preset name, a keras layer or a list of layers, "
                f"received {type(layer).__name__}."
            )
    return keras.Sequential(layers, name=AUGMENTATION)


def image_features(base_layer, input_shape, *, preprocessing="none", pooling="avg",
                   augmentation=None):
    """The input-to-"features" part of an image transfer model around `base_layer`.

    Returns `(inputs, features)`: a `keras.Input` named "image" for raw
    pixels and the pooled feature tensor (layer "features"); in between the
    optional "augmentation", the "preprocessing" (`ImagePreprocessing` mode
    or a layer, e.g. a KerasHub `ImageConverter`) and the base in inference
    mode. `pooling`: "avg", "max", None, or a layer called on `[tokens, mask]`.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if augmentation is not None:
        x = augmentation_layer(augmentation)(x)
    if isinstance(preprocessing, str):
        preprocessing = ImagePreprocessing(preprocessing, name=PREPROCESSING)
    x = preprocessing(x)
    x = in_inference_mode(base_layer)(x)
    if isinstance(pooling, keras.layers.Layer):  # a token pooling, e.g. for vision transformers
        return inputs, pooling([x, keras.ops.ones_like(x[..., 0], dtype="bool")])
    return inputs, pooling_layer(pooling, len(x.shape))(x)


def pooling_layer(pooling, rank):
    """The layer named "features" that turns a base's output of `rank` into a vector."""
    if rank == 2:
        return keras.layers.Identity(name=FEATURES)
    if rank != 4:
        raise ValueError(f"Expected the base to output a 2D or 4D tensor, received rank {rank}.")
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=FEATURES)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=FEATURES)
    if pooling is None:
        return keras.layers.Flatten(name=FEATURES)
    raise ValueError(f"Expected pooling in ('avg', 'max', None), received pooling={pooling!r}.")


def _layer(model, name):
    try:
        return model.get_layer(name)
    except ValueError:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no layer named {name!r}: expected a "
            "model built by tlkeras.build_transfer_model."
        ) from None


def _fresh(regularizer):
    """A new regularizer object equal to `regularizer` (a name, an object or None)."""
    if regularizer is None:
        return None
    return keras.regularizers.get(keras.regularizers.serialize(keras.regularizers.get(regularizer)))
