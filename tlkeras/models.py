"""Building transfer models, and choosing which part of the base trains.

Every model built here is a functional `keras.Model` with this layer layout:

    image (raw RGB pixels in [0, 255])
      -> "augmentation" (optional; active only in training)
      -> "preprocessing" (`ImagePreprocessing`, the architecture's own)
      -> the base, wrapped in `InferenceMode`: always run with `training=False`
      -> "features" (pooling; the pooled feature vector)
      -> "head_dropout", "head_dense_<i>", ... -> "predictions" (float32)

Example:

>>> import numpy as np, tlkeras
>>> model = tlkeras.build_transfer_model(
...     "MobileNetV2", num_classes=3, input_shape=(64, 64, 3), weights=None)
>>> model.predict(np.zeros((1, 64, 64, 3), "uint8"), verbose=0).shape
(1, 3)
>>> tlkeras.unfreeze(model, 2, unit="blocks")  # the top two inverted-residual blocks
"""

import contextlib
import os

import keras

from tlkeras import backbones
from tlkeras import text
from tlkeras import weights as weights_module
from tlkeras.layers import ImagePreprocessing, InferenceMode

TASKS = ("multiclass", "binary", "multilabel", "regression")
_HEAD_PREFIXES = ("head_", "predictions")


class WeightsDownloadError(OSError):
    """Raised when pretrained weights cannot be downloaded (e.g. offline)."""


def build_transfer_model(
    base,
    num_classes=None,
    *,
    task="multiclass",
    input_shape=None,
    weights="imagenet",
    pooling="avg",
    dropout=0.2,
    hidden_units=(),
    kernel_regularizer=None,
    augmentation=None,
    trainable_layers=0,
    name=None,
):
    """Builds a frozen pretrained base plus a new head, as one `keras.Model`.

    Args:
        base: a name from `tlkeras.backbones.list_backbones()` (case-insensitive),
            a `keras.Model` you built (its preprocessing is then yours: it
            receives raw [0, 255] pixels), `"hub:<handle>"` or a SavedModel
            directory, or a KerasHub preset name or directory.
        num_classes: number of classes (`"multiclass"`, `"multilabel"`), or of
            regression targets (default 1). Not needed for `"binary"`.
        task: `"multiclass"` (softmax), `"binary"` (one sigmoid unit),
            `"multilabel"` (a sigmoid per class) or `"regression"` (linear).
            The output is float32 under any mixed-precision policy.
        input_shape: `(height, width, 3)`; defaults to the architecture's size.
            For a KerasHub text preset, `(sequence_length,)`: the model then
            takes raw strings.
        weights: `"imagenet"`, `None`, or a path to a `.weights.h5`, a legacy
            `.h5` or a `.keras` file holding the same architecture. Ignored
            (except a path) when `base` is your own model. For hub modules and
            KerasHub presets `"imagenet"` means their own pretrained weights;
            `None` gives random weights for a KerasHub preset and is an error
            for a hub module.
        pooling: `"avg"`, `"max"` or `None` (flatten).
        dropout: dropout rate before each dense layer of the head.
        hidden_units: sizes of hidden `Dense(relu)` layers in the head.
        kernel_regularizer: regularizer of the head's Dense kernels, e.g.
            `keras.regularizers.L1L2(l1=0.0, l2=1e-4)` or `"l2"`.
        augmentation: `None`, a preset name (see `tlkeras.data`), a layer, or
            a list of layers, applied only in training.
        trainable_layers: unfreeze the top N layers of the base
            (BatchNormalization stays frozen). 0 keeps the base frozen.
        name: model name.

    Returns:
        An uncompiled `keras.Model` taking raw RGB pixels in [0, 255].
    """
    units, activation = _head_output(task, num_classes)
    if isinstance(base, str) and not backbones.exists(base):
        from tlkeras import hub

        inputs, features, base_layer = hub.build_features(
            base, input_shape=input_shape, weights=weights, pooling=pooling,
            augmentation=augmentation,
        )
    else:
        if isinstance(base, keras.layers.Layer):
            base_layer, mode = base, "none"
            if isinstance(weights, (str, os.PathLike)) and weights != "imagenet":
                load_base_weights(base_layer, weights)
            input_shape = _user_input_shape(base_layer, input_shape)
        elif isinstance(base, str):
            spec = backbones.get(base)
            base_layer, mode = _build_registry_base(spec, input_shape, weights), spec.preprocessing
            input_shape = base_layer.input_shape[1:]
        else:
            raise TypeError(
                "build_transfer_model: expected `base` to be a backbone name, a keras.Model, "
                f"a hub handle or a KerasHub preset; received {type(base).__name__}."
            )
        inputs, features = image_features(
            base_layer, input_shape, preprocessing=mode, pooling=pooling,
            augmentation=augmentation,
        )
    x = features
    for i, width in enumerate(hidden_units):
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"head_dropout_{i}")(x)
        x = keras.layers.Dense(width, activation="relu", kernel_regularizer=kernel_regularizer,
                               name=f"head_dense_{i}")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(units, activation=activation, dtype="float32",
                                 kernel_regularizer=kernel_regularizer, name="predictions")(x)
    model_class = text.TextModel if inputs.dtype == "string" else keras.Model
    model = model_class(inputs, outputs, name=name or f"{base_layer.name}_transfer")
    freeze(model)
    if trainable_layers:
        unfreeze(model, trainable_layers)
    return model


def image_features(base_layer, input_shape, *, preprocessing="none", pooling="avg", augmentation=None):
    """The input-to-"features" part of a transfer model around `base_layer`.

    Returns `(inputs, features)`: a `keras.Input` for raw pixels and the pooled
    feature tensor (from a layer named "features"). Mid-level piece of
    `build_transfer_model`, also used by the hub module.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if augmentation is not None:
        x = _augmentation_layer(augmentation)(x)
    x = ImagePreprocessing(preprocessing, name="preprocessing")(x)
    x = InferenceMode(base_layer)(x)
    return inputs, pooling_layer(pooling, len(x.shape))(x)


def pooling_layer(pooling, rank):
    """The layer named "features" that turns a base's output of `rank` into a vector."""
    if rank == 2:
        return keras.layers.Identity(name="features")
    if rank != 4:
        raise ValueError(f"Expected the base to output a 2D or 4D tensor, received rank {rank}.")
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="features")
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="features")
    if pooling is None:
        return keras.layers.Flatten(name="features")
    raise ValueError(f"Expected pooling in ('avg', 'max', None), received pooling={pooling!r}.")


def infer_task(model):
    """The task of a built model, read from its "predictions" layer."""
    layer = model.get_layer("predictions")
    activation = keras.activations.serialize(layer.activation)
    activation = activation if isinstance(activation, str) else activation.get("config", activation)
    if activation == "softmax":
        return "multiclass"
    if activation == "sigmoid":
        return "binary" if layer.units == 1 else "multilabel"
    return "regression"


def get_base(model):
    """The pretrained base inside a model built by `build_transfer_model`."""
    try:
        features = model.get_layer("features")
    except ValueError:
        raise ValueError(
            f"Model {model.name!r} has no layer named 'features': expected a model built by "
            "tlkeras.build_transfer_model."
        ) from None
    base = features._inbound_nodes[0].input_tensors[0]._keras_history.operation
    return base.layer if isinstance(base, InferenceMode) else base


def split_model(model):
    """Splits a transfer model into `(feature_extractor, head)`.

    `feature_extractor` maps images to the "features" vector; `head` maps
    features to predictions. Both share the layers (and weights) of `model`,
    so training `head` trains `model`'s head.
    """
    features = model.get_layer("features")
    extractor = keras.Model(model.inputs, features.output, name=f"{model.name}_features")
    head_input = keras.Input(shape=tuple(features.output.shape[1:]), name="features")
    # Layers of a functional model are in graph order; the head is the chain after "features".
    x = head_input
    for layer in model.layers[model.layers.index(features) + 1:]:
        x = layer(x)
    return extractor, keras.Model(head_input, x, name=f"{model.name}_head")


def without_augmentation(model):
    """The same model (shared layers and weights) without its "augmentation" layer.

    Augmentation is a no-op at inference; dropping it keeps its random ops out of
    exported graphs (TFLite cannot convert them). Returns `model` if it has none.
    """
    if "augmentation" not in [layer.name for layer in model.layers]:
        return model
    inputs = keras.Input(shape=tuple(model.input_shape[1:]), name=model.inputs[0].name)
    x = inputs
    for layer in model.layers[1:]:  # a tlkeras image model is a chain of layers
        if layer.name != "augmentation":
            x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def freeze(model):
    """Freezes the whole base; the head stays trainable."""
    set_trainable_depth(get_base(model), 0)


def unfreeze(model, depth="all", unit="layers"):
    """Unfreezes the top `depth` layers or blocks of the base (`"all"`: the whole base).

    BatchNormalization layers stay frozen, and the base always runs in
    inference mode, so their statistics never change. Re-compile after
    changing what trains. Returns the list of layers set trainable.
    """
    return set_trainable_depth(get_base(model), depth, unit)


def set_trainable_depth(base, depth, unit="layers"):
    if unit not in ("layers", "blocks"):
        raise ValueError(f"Expected unit in ('layers', 'blocks'), received unit={unit!r}.")
    groups = base_blocks(base) if unit == "blocks" else [(l.name, [l]) for l in _base_layers(base)]
    if depth == "all":
        depth = len(groups)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"Expected depth to be a non-negative int or 'all', received depth={depth!r}.")
    chosen = [layer for _, layers in groups[len(groups) - depth:] for layer in layers] if depth else []
    base.trainable = bool(chosen)
    if chosen and isinstance(base, keras.Model):
        chosen_ids = {id(layer) for layer in chosen}
        for layer in base.layers:
            layer.trainable = id(layer) in chosen_ids
    for layer in _all_sublayers(base):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return chosen


def base_blocks(base):
    """The base's layers grouped into its architecture's blocks, bottom to top.

    Returns a list of `(block_name, [layers])`. For a `keras.applications`
    base these are the family's own blocks (see `tlkeras.backbones`); for any
    other model each layer with weights (other than BatchNormalization)
    starts a new block.
    """
    layers = _base_layers(base)
    spec = backbones.find_spec_for_model(base)
    if spec is not None:
        names = spec.block_of([layer.name for layer in layers])
    else:
        names, current = [], layers[0].name if layers else "stem"
        for layer in layers:
            starts_block = layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
            current = layer.name if starts_block else current
            names.append(current)
    blocks = []
    for name, layer in zip(names, layers):
        if blocks and blocks[-1][0] == name:
            blocks[-1][1].append(layer)
        else:
            blocks.append((name, [layer]))
    return blocks


def trainable_summary(model, print_fn=print):
    """Prints (and returns) which blocks of the base train, with parameter counts."""
    base = get_base(model)
    rows = []
    for name, layers in base_blocks(base):
        total = sum(_count(w) for layer in layers for w in layer.weights)
        trainable = sum(_count(w) for layer in layers for w in layer.trainable_weights)
        if total:
            state = "yes" if trainable == total else ("partly" if trainable else "no")
            rows.append((name, len(layers), trainable, total, state))
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"{'block':<{width}}  layers  trainable params / total  trains"]
    lines += [f"{r[0]:<{width}}  {r[1]:>6}  {r[2]:>16,} / {r[3]:<10,} {r[4]}" for r in rows]
    head = sum(_count(w) for w in model.trainable_weights) - sum(r[2] for r in rows)
    lines.append(f"base: {sum(r[2] for r in rows):,} of {sum(r[3] for r in rows):,} params trainable; "
                 f"head: {head:,} trainable params")
    text = "\n".join(lines)
    if print_fn:
        print_fn(text)
    return text


def load_base_weights(base, path):
    """Loads weights for `base` from a `.weights.h5`, legacy `.h5` or `.keras` file (a base alone
    or a whole model holding it; see `tlkeras.weights`)."""
    return weights_module.load_base_weights(base, path)


def weights_info(name):
    """Where Keras downloads ImageNet weights for backbone `name` from, and caches them.

    Returns a dict with `file_name`, `url` and `cache_path` (put the file there
    to use `weights="imagenet"` offline). Nothing is downloaded.
    """
    spec = backbones.get(name)

    class _Stop(Exception):
        pass

    def fake_get_file(*args, **kwargs):
        raise _Stop

    with _recording_get_file(fake_get_file) as calls:
        try:
            spec.build(weights="imagenet")
        except _Stop:
            pass
    if not calls:
        raise RuntimeError(f"Keras did not ask for a weights file for {spec.name}.")
    return calls[-1]


def _build_registry_base(spec, input_shape, weights):
    if weights is None or weights == "imagenet":
        with _recording_get_file() as calls:
            try:
                return spec.build(input_shape, weights)
            except Exception as error:
                if not calls or os.path.isfile(calls[-1]["cache_path"]):
                    raise
                info = calls[-1]
                raise WeightsDownloadError(
                    f"Could not download ImageNet weights for {spec.name}: Keras wanted the file "
                    f"{info['file_name']!r} from {info['url']} ({type(error).__name__}: {error}).\n"
                    "Offline, do one of:\n"
                    f"  1. download that file elsewhere and pass weights='/path/to/{info['file_name']}'"
                    " to build_transfer_model (or --weights PATH on the command line), or\n"
                    f"  2. put it at {info['cache_path']} (the Keras cache; set KERAS_HOME to move it)"
                    " and keep weights='imagenet'."
                ) from error
    base = spec.build(input_shape, None)
    load_base_weights(base, weights)
    return base


@contextlib.contextmanager
def _recording_get_file(replacement=None):
    """Records every `get_file` call keras.applications makes while active."""
    from keras.src.backend import config
    from keras.src.utils import file_utils

    original, calls = file_utils.get_file, []

    def wrapper(fname=None, origin=None, *args, **kwargs):
        cache_dir = os.path.expanduser(kwargs.get("cache_dir") or config.keras_home())
        if not os.access(cache_dir, os.W_OK):  # as Keras does
            cache_dir = os.path.join("/tmp", ".keras")
        cache_path = os.path.join(cache_dir, kwargs.get("cache_subdir", "datasets"), fname)
        calls.append({"file_name": fname, "url": origin, "cache_path": cache_path})
        return (replacement or original)(fname, origin, *args, **kwargs)

    file_utils.get_file = wrapper
    try:
        yield calls
    finally:
        file_utils.get_file = original


def _head_output(task, num_classes):
    if task not in TASKS:
        raise ValueError(f"Expected task in {TASKS}, received task={task!r}.")
    if task == "binary":
        if num_classes not in (None, 1, 2):
            raise ValueError(f"task='binary' has one sigmoid output; received num_classes={num_classes}.")
        return 1, "sigmoid"
    if task == "regression":
        return num_classes or 1, "linear"
    minimum = 2 if task == "multiclass" else 1
    if not isinstance(num_classes, int) or num_classes < minimum:
        raise ValueError(
            f"task={task!r} needs num_classes >= {minimum}, received num_classes={num_classes!r}."
        )
    return num_classes, "softmax" if task == "multiclass" else "sigmoid"


def _user_input_shape(base, input_shape):
    if input_shape is not None:
        return tuple(input_shape)
    try:
        return tuple(base.input_shape[1:])
    except (AttributeError, ValueError):
        raise ValueError(
            f"Cannot tell the input shape of base {base.name!r}; pass input_shape=(height, width, 3)."
        ) from None


def _augmentation_layer(augmentation):
    if isinstance(augmentation, str):
        from tlkeras import data

        return data.augmentation_preset(augmentation, name="augmentation")
    layers = list(augmentation) if isinstance(augmentation, (list, tuple)) else [augmentation]
    for layer in layers:
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                "augmentation: expected a preset name, a keras layer or a list of layers, "
                f"received {type(layer).__name__}."
            )
    return keras.Sequential(layers, name="augmentation")


def _base_layers(base):
    if isinstance(base, keras.Model):
        return [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]
    return [base]


def _all_sublayers(layer):
    return list(layer._flatten_layers(include_self=False, recursive=True))


def _count(weight):
    n = 1
    for dim in weight.shape:
        n *= dim
    return n
