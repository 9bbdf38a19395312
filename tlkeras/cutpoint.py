"""Cut-point activation cache: fine-tune the top blocks without re-running the frozen bottom.

With the top k blocks of the base unfrozen and no augmentation, the frozen
part below them maps each image to the same activations in every epoch.
`split_at` cuts a transfer model there into `bottom` (images -> activations at
the cut) and `top` (activations -> predictions), both sharing the model's
layers; `cut_activations` runs `bottom` once over a dataset and keeps the
activations in float16 (in memory, and on disk when given a folder), keyed
by a fingerprint of the bottom's weights and the data, so a changed frozen
part or other data compute them again. Training `top` on them trains the
model in place. `tlkeras.fine_tune` does this in phase 2 by itself
(`cache_activations="auto"`) and takes phase 1's head features from the same
activations (`head_features`), so one pass of the frozen part serves both
phases. float16 storage makes the weights differ from recomputing by a
relative ~1e-3 after an epoch (see tests/test_cutpoint.py).
The saving is the frozen part's forward pass; the top's backward pass stays.
`top` computes its 1x1 convolutions (separable convolutions' pointwise part)
as matrix products, whose gradients TensorFlow's CPU kernels run ~3.6x
faster (same weights, same outputs). On CPUs without AVX-512 TensorFlow
leaves its oneDNN kernels off, and the rest of that backward pass is slower:
`TF_ENABLE_ONEDNN_OPTS=1` before importing TensorFlow turns them on
(bench/RESULTS.md, issue 12).

Example:

>>> import keras, numpy as np, tensorflow as tf, tlkeras
>>> from tlkeras import cutpoint
>>> base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, name="c1"),
...                          keras.layers.Conv2D(4, 3, name="c2")], name="cnn")
>>> model = tlkeras.build_transfer_model(base, 2)
>>> bottom, top = cutpoint.split_at(model, 1)
>>> data = tf.data.Dataset.from_tensor_slices(
...     (np.zeros((8, 16, 16, 3), "uint8"), np.zeros(8, "int32"))).batch(4)
>>> cached = cutpoint.cut_activations(bottom, data, verbose=0)
>>> cached.activations.shape, cached.activations.dtype
((8, 14, 14, 4), dtype('float16'))
"""

import dataclasses
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from tlkeras import anatomy, atomic, features, models, phases
from tlkeras.layers import InferenceMode

logger = logging.getLogger("tlkeras")

__all__ = ["CutActivations", "cut_activations", "split_at"]

DEFAULT_BUDGET = 2 * 2**30  # bytes of float16 activations kept per dataset


@dataclasses.dataclass
class CutActivations:
    """Activations at the cut (float16) and their labels; `cache_path` when on disk."""

    activations: np.ndarray
    labels: np.ndarray | None
    cache_path: str | None = None

    def dataset(self, batch_size, shuffle, seed=None):
        """Batches of `(float32 activations, labels)`, shuffled each epoch when `shuffle`."""
        elements = (self.activations, self.labels)
        ds = tf.data.Dataset.from_tensor_slices(elements)
        if shuffle:
            ds = ds.shuffle(len(self.activations), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).map(lambda a, y: (tf.cast(a, tf.float32), y)).prefetch(
            tf.data.AUTOTUNE)


def split_at(model, depth, unit="blocks"):
    """`(bottom, top)` cut below the top `depth` blocks (or layers) of the base, or `None`.

    `bottom`: images -> activations entering the top `depth` blocks (the
    frozen part, with the model's preprocessing, no augmentation). `top`:
    those activations -> the model's output. Both share `model`'s layers.
    `None` when there is nothing below to freeze (`"all"`, or `depth` >= the
    number of blocks) or when the blocks above the cut take more than one
    tensor from below it (no single cut).
    """
    base = models.get_base(model)
    if not isinstance(base, keras.Model):
        return None
    groups = models.base_blocks(base) if unit == "blocks" else [
        (layer.name, [layer]) for layer in models._base_layers(base)]
    if depth == "all" or not depth or depth >= len(groups):
        return None
    first = groups[len(groups) - depth][1][0]
    graph = getattr(base, "_functional", None) or base  # a Sequential's own graph
    nodes = {id(node) for depth_nodes in getattr(graph, "_nodes_by_depth", {}).values()
             for node in depth_nodes}  # a rebuilt base's layers keep stale nodes too
    cut = next((node.input_tensors for node in first._inbound_nodes if id(node) in nodes), [])
    if len(cut) != 1:
        return None
    try:
        upper = keras.Model(cut[0], base.outputs[0], name=f"{base.name}_top")
    except ValueError:  # a layer above needs another tensor from below the cut
        return None
    expected = {id(layer) for _, layers in groups[len(groups) - depth:] for layer in layers}
    if {id(layer) for layer in upper.layers[1:]} != expected:
        return None
    lower = keras.Model(base.inputs, cut[0], name=f"{base.name}_bottom")
    image = keras.Input(tuple(model.input_shape[1:]), name="image")
    bottom = keras.Model(image, InferenceMode(lower)(model.get_layer("preprocessing")(image)),
                         name=f"{model.name}_bottom")
    activations = keras.Input(tuple(cut[0].shape[1:]), name="cut_activations")
    # The same layers, but 1x1 convolutions as matrix products (see _MatmulPointwise).
    upper = keras.models.clone_model(upper, clone_function=_matmul_pointwise)
    x = InferenceMode(upper)(activations)
    head = model.layers[model.layers.index(model.get_layer("features")):]
    for layer in head:  # "features" and the head: a chain, as in models.split_model
        x = layer(x)
    return bottom, keras.Model(activations, x, name=f"{model.name}_top")


class _MatmulPointwise(keras.layers.Wrapper):
    """A `SeparableConv2D` (stride 1) or 1x1 `Conv2D`, its 1x1 part computed as a matmul.

    Same weights (the wrapped layer's), same outputs. Training the top is
    mostly its backward pass, and TensorFlow's CPU gradient of a 1x1
    convolution's input takes ~3.6x the time of the same product as a
    `tf.matmul` (bench/RESULTS.md, issue 12, session 5). Used only inside
    the `top` that `split_at` returns, never saved.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(layer, name=layer.name, dtype=layer.dtype_policy, **kwargs)

    def build(self, input_shape=None):
        self.built = True

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def call(self, x):
        layer = self.layer
        if isinstance(layer, keras.layers.SeparableConv2D):
            depthwise = keras.ops.cast(layer.depthwise_kernel, x.dtype)
            x = tf.nn.depthwise_conv2d(x, depthwise, [1, 1, 1, 1], layer.padding.upper())
            kernel = layer.pointwise_kernel
        else:  # 1x1: "same" and "valid" keep the same pixels
            x = x[:, ::layer.strides[0], ::layer.strides[1], :]
            kernel = layer.kernel
        channels, filters = kernel.shape[-2:]
        shape = tf.shape(x)
        y = tf.matmul(tf.reshape(x, [-1, channels]),
                      tf.reshape(keras.ops.cast(kernel, x.dtype), [channels, filters]))
        y = tf.reshape(y, tf.concat([shape[:-1], [filters]], 0))
        if layer.use_bias:
            y = tf.nn.bias_add(y, keras.ops.cast(layer.bias, y.dtype))
        return y if layer.activation is None else layer.activation(y)


def _matmul_pointwise(layer):
    """`layer`, or a `_MatmulPointwise` of it when it is one it computes exactly."""
    common = (getattr(layer, "data_format", None) == "channels_last"
              and tuple(getattr(layer, "dilation_rate", ())) == (1, 1)
              and getattr(layer, "activity_regularizer", None) is None)
    if isinstance(layer, keras.layers.SeparableConv2D):
        ok = tuple(layer.strides) == (1, 1)
    else:
        ok = (type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == (1, 1)
              and layer.groups == 1)
    return _MatmulPointwise(layer) if common and ok else layer


def cut_activations(bottom, dataset, *, cache_dir=None, key=None, budget_bytes=DEFAULT_BUDGET,
                    verbose=1):
    """Runs `bottom` once over `dataset` of `(images, labels)`; a `CutActivations`, or `None`.

    With `cache_dir`, saved to / loaded from `<cache_dir>/<fingerprint>.npz`,
    the fingerprint covering `bottom`'s architecture and weights, the element
    spec and `dataset.file_paths` (or `key`; required without file paths).
    `None` when the activations would exceed `budget_bytes`.
    """
    return _cut(bottom, dataset, cache_dir, key, budget_bytes, verbose)


def _cut(bottom, dataset, cache_dir, key, budget_bytes=DEFAULT_BUDGET, verbose=0, step=None):
    """`cut_activations`, with `step` (from `_bottom_step`) when one is traced already."""
    path = None if cache_dir is None else cache_path(bottom, dataset, cache_dir, key)
    if path and os.path.exists(path):
        with np.load(path) as f:
            return CutActivations(f["activations"], f["labels"], path)
    step = step or _bottom_step(bottom, dataset)
    per_sample = 2 * int(np.prod(bottom.output.shape[1:]))
    outputs = _run(step, dataset, per_sample, budget_bytes, verbose)
    if outputs is None:
        return None
    (activations,), labels = outputs
    return save(CutActivations(activations, labels, path))


def cache_path(bottom, dataset, cache_dir, key=None):
    """Where `cut_activations(bottom, dataset, cache_dir=..., key=...)` keeps its file."""
    return os.path.join(os.fspath(cache_dir),
                        "cut_" + features._cache_key(bottom, dataset, key) + ".npz")


def features_and_cuts(model, datasets, depths, unit="blocks", *, budget_bytes=DEFAULT_BUDGET,
                      verbose=0):
    """One pass of the frozen base over each dataset: its features and cut activations at once.

    For a search over several depths (`tlkeras.tune`): the pooled "features"
    that `tlkeras.extract_features(model, data)` computes and the
    activations that `cut_activations(bottom, data)` computes below the top
    `depth` blocks, for each of `depths` with a single cut (`split_at`) whose
    activations fit `budget_bytes` per dataset together with the shallower
    depths', from one traced function of the whole base instead of one pass
    (and two traces) per depth and one for the features.

    Returns `(bottoms, results)`: `bottoms` maps each depth kept to its
    `bottom`; `results` holds, per dataset, `(FeatureSet, {depth: CutActivations})`.
    """
    base = models.get_base(model)
    samples = max(phases.steps_per_epoch(d) * phases.batch_size(d) for d in datasets)
    bottoms, size = {}, 0
    for depth in sorted({d for d in depths if isinstance(d, int) and d > 0}):
        parts = split_at(model, depth, unit)
        if parts is None:
            continue
        per_sample = 2 * int(np.prod(parts[0].output.shape[1:]))
        if (size + per_sample) * samples > budget_bytes:
            break
        size += per_sample
        bottoms[depth] = parts[0]
    cuts = [bottom.layers[-1].layer.outputs[0] for bottom in bottoms.values()]  # base tensors
    multi = keras.Model(base.inputs, [*cuts, base.outputs[0]], name=f"{base.name}_cuts")
    image = keras.Input(tuple(model.input_shape[1:]), name="image")
    *activations, top = InferenceMode(multi)(model.get_layer("preprocessing")(image))
    pooled = model.get_layer(anatomy.FEATURES)(top)
    extractor = keras.Model(image, [pooled, *activations], name=f"{model.name}_features_cuts")

    def outputs(x):
        pooled, *activations = keras.tree.flatten(extractor(x, training=False))
        return [tf.cast(pooled, tf.float32)] + [tf.cast(a, tf.float16) for a in activations]

    step = _traced(datasets[0], outputs)
    results = []
    for dataset in datasets:
        (pooled, *activations), labels = _run(step, dataset, 0, budget_bytes, verbose)
        results.append((features.FeatureSet(pooled, labels), {
            depth: CutActivations(a, labels) for depth, a in zip(bottoms, activations)}))
    return bottoms, results


def _traced(dataset, outputs):
    """`outputs` as a `tf.function` traced once for every batch size of `dataset`'s images."""
    spec = dataset.element_spec[0]
    return tf.function(outputs, input_signature=[
        tf.TensorSpec((None, *spec.shape[1:]), spec.dtype)])


def _bottom_step(bottom, dataset):
    return _traced(dataset, lambda x: [tf.cast(bottom(x, training=False), tf.float16)])


def _run(step, dataset, per_sample, budget_bytes, verbose):
    """`(outputs, labels)` of `step` over `dataset` (arrays); `None` past `budget_bytes`."""
    steps = int(dataset.cardinality())
    bar = keras.utils.Progbar(steps if steps > 0 else None, verbose=verbose, unit_name="batch")
    chunks, labels, size = [], [], 0
    for i, (x, y, *_) in enumerate(dataset):
        size += per_sample * int(tf.shape(x)[0])
        if size > budget_bytes:
            logger.info("Cut-point activations exceed %d bytes; not cached.", budget_bytes)
            return None
        chunks.append(step(x))  # no per-batch sync: numpy() once at the end
        labels.append(np.asarray(y))
        bar.update(i + 1)
    return [tf.concat(c, 0).numpy() for c in zip(*chunks)], np.concatenate(labels)


def save(cached):
    """Writes `cached` to its `cache_path` (atomically) when it has one; returns it."""
    if cached.cache_path:
        with atomic.path(cached.cache_path) as tmp:
            np.savez(tmp, activations=cached.activations, labels=cached.labels)
    return cached


def cut_point(model, train, val, depth, unit, cache_activations, *, augmented, distributed,
              cache_dir=None, verbose=0):
    """`(top, train activations, validation activations or None)` below the top `depth` blocks.

    `None` when not cached. `cache_activations`: `"auto"` (on when it can be:
    a single cut below the top `depth` blocks, no augmentation, no
    distribution strategy), `True` (an error when it cannot), or `False`.
    """
    if cache_activations is False:
        return None
    reason = ("the training data is augmented (in the model, the pipeline or mix=)" if augmented
              else "a distribution strategy is in use" if distributed else None)
    parts = None if reason else split_at(model, depth, unit)
    if parts is None and reason is None:
        reason = f"unfreeze={depth!r} leaves no single cut below the trainable blocks"
    if reason:
        if cache_activations is True:
            raise ValueError(f"cache_activations=True, but {reason}. Use 'auto' or False.")
        return None
    bottom, top = parts
    step = _bottom_step(bottom, train)  # traced once, for the validation data too
    cached = _cut(bottom, train, cache_dir, "train", verbose=verbose, step=step)
    same = val is not None and val.element_spec[0] == train.element_spec[0]
    cached_val = None if val is None or cached is None else _cut(
        bottom, val, cache_dir, "validation", verbose=verbose, step=step if same else None)
    if cached is None or (val is not None and cached_val is None):
        return None
    return top, cached, cached_val


def phase_inputs(model, train, val, depth, unit, cache_activations, *, augmented, distributed,
                 cache_dir=None, verbose=0, seed=None, cut=None):
    """`(fit_model, train, val)` for `fine_tune`'s phase 2: the top on cached activations, or as is.

    `cut`: a `cut_point` result already computed for these data (phase 1's
    features came from it); otherwise `cut_point` runs here.
    """
    cut = cut or cut_point(model, train, val, depth, unit, cache_activations, augmented=augmented,
                           distributed=distributed, cache_dir=cache_dir, verbose=verbose)
    if cut is None:
        return model, train, val
    top, cached, cached_val = cut
    batch = next(iter(train))[0].shape[0]
    fit_val = None if cached_val is None else cached_val.dataset(next(iter(val))[0].shape[0], False)
    return top, cached.dataset(batch, True, seed), fit_val


def head_features(top, cached, *, batch_size=32, verbose=0):
    """Pooled "features" (a `tlkeras.features.FeatureSet`) computed from cut activations.

    The top blocks of `top` (from `split_at`) run in inference mode on
    `cached`, then the model's pooling: phase 1's head features without a
    second pass of the frozen part. They equal those of
    `tlkeras.extract_features(model, ...)` up to the float16 rounding of
    the activations (see tests/test_cutpoint.py).
    """
    blocks = next(layer for layer in top.layers if isinstance(layer, InferenceMode))
    inputs = keras.Input(tuple(top.input_shape[1:]), name="cut_activations")
    pooled = top.get_layer(anatomy.FEATURES)(blocks(inputs))
    extractor = keras.Model(inputs, pooled, name=f"{top.name}_features")
    return features.extract_features(extractor, cached.dataset(batch_size, False), verbose=verbose)
