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
>>> trainable = tlkeras.unfreeze(model, 2)  # the top two inverted-residual blocks
>>> sorted({layer.name.split("_")[0] for layer in trainable})
['Conv', 'block', 'out']
"""

import keras

from tlkeras import anatomy, backbones, bases, deprecation, text
from tlkeras import weights as weights_module
from tlkeras.anatomy import (  # noqa: F401 - public here too
    TASKS,
    get_base,
    get_head,
    head_config,
    infer_task,
    pooling_layer,
    split_model,
    without_augmentation,
)
from tlkeras.bases import WeightsDownloadError, weights_info  # noqa: F401 - public here too


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
    unfreeze=0,
    unfreeze_unit="blocks",
    name=None,
    trainable_layers=None,
):
    """Builds a frozen pretrained base plus a new head, as one `keras.Model`.

    Args:
        base: a name from `tlkeras.backbones.list_backbones()` (case-insensitive),
            a `keras.Model` you built (its preprocessing is then yours: it
            receives raw [0, 255] pixels), a `.keras` file holding a base or a
            whole transfer model, `"hub:<handle>"` or a SavedModel directory,
            or a KerasHub preset name or directory (see `tlkeras.resolve_base`).
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
        unfreeze: unfreeze the top N blocks (or layers, see `unfreeze_unit`)
            of the base, or `"all"` (BatchNormalization stays frozen). 0 keeps
            the base frozen.
        unfreeze_unit: `"blocks"` (the architecture's own) or `"layers"`.
        name: model name.
        trainable_layers: deprecated; `unfreeze=N, unfreeze_unit="layers"`.

    Returns:
        An uncompiled `keras.Model` taking raw RGB pixels in [0, 255].
    """
    if trainable_layers is not None:
        unfreeze, unfreeze_unit = deprecation.renamed(
            "build_transfer_model", "trainable_layers", trainable_layers,
            "unfreeze (with unfreeze_unit='layers')"), "layers"
    units, activation = anatomy.output_units(task, num_classes)
    resolved = bases.resolve_base(base, input_shape, weights)
    inputs, features, base_layer = bases.base_features(
        resolved, pooling=pooling, augmentation=augmentation)
    outputs = anatomy.build_head(features, units, activation, dropout=dropout,
                                 hidden_units=hidden_units, kernel_regularizer=kernel_regularizer)
    model_class = text.TextModel if inputs.dtype == "string" else keras.Model
    model = model_class(inputs, outputs, name=name or f"{base_layer.name}_transfer")
    set_trainable_depth(get_base(model), unfreeze or 0, unfreeze_unit)
    return model


image_features = anatomy.image_features  # also public here


def freeze(model):
    """Freezes the whole base; the head stays trainable."""
    set_trainable_depth(get_base(model), 0)


def unfreeze(model, depth="all", unit="blocks"):
    """Unfreezes the top `depth` blocks (or layers) of the base (`"all"`: the whole base).

    `unit` is `"blocks"` (the architecture's own blocks, see `base_blocks`;
    the default) or `"layers"`.

    BatchNormalization layers stay frozen, and the base always runs in
    inference mode, so their statistics never change. Re-compile after
    changing what trains. Returns the list of layers set trainable.
    """
    return set_trainable_depth(get_base(model), depth, unit)


def set_trainable_depth(base, depth, unit="blocks"):
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


_augmentation_layer = anatomy.augmentation_layer


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
