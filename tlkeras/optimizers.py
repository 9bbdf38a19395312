"""Per-group learning rates for fine-tuning: discriminative rates and gradual unfreezing.

Scaling gradients does not change Adam's step (it divides the scale out), so
the learning rate itself must differ per variable. `layerwise` turns a Keras
optimizer (Adam, AdamW, SGD, RMSprop) into its `Layerwise*` twin, which
multiplies the learning rate of each variable by a factor looked up by the
variable's path, and can hold whole groups of variables still (learning rate
and gradient 0) until they are unfrozen. The factors are in the optimizer's
config, so a compiled model saves and loads with them (`.keras`, safe mode),
and the unfrozen count is an optimizer variable, so `BackupAndRestore`
checkpoints it.

Example:

>>> import keras, numpy as np
>>> from tlkeras import optimizers
>>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="a"),
...                           keras.layers.Dense(1, name="b")])
>>> kernel = model.get_layer("a").kernel
>>> opt = optimizers.layerwise(keras.optimizers.SGD(0.1), {kernel.path: 0.5})
>>> model.compile(opt, "mse")
>>> before = kernel.numpy().copy()
>>> _ = model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)
>>> opt.learning_rate_multiplier(kernel)
0.5
"""

import keras

from tlkeras import models

__all__ = ["GradualUnfreezing", "block_groups", "fine_tuning_setup", "group_multipliers", "layerwise"]


class _LayerwiseMixin:
    """Scales the learning rate per variable (`multipliers`: path -> factor) and gates groups."""

    def __init__(self, *args, multipliers=None, groups=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.multipliers = {str(k): float(v) for k, v in (multipliers or {}).items()}
        self.groups = {str(k): int(v) for k, v in (groups or {}).items()}
        self._scales, self._group_of = [], []

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._scales = [self.multipliers.get(v.path, 1.0) for v in variables]
        self._group_of = [self.groups.get(v.path, -1) for v in variables]
        # groups with index < unfrozen_groups train; the head (group -1) always does
        self.unfrozen_groups = self.add_variable(
            (), initializer=keras.initializers.Constant(max(self.groups.values(), default=0) + 1),
            dtype="int32", name="unfrozen_groups")

    def learning_rate_multiplier(self, variable):
        """The factor on the learning rate of `variable` (a model variable)."""
        return self.multipliers.get(variable.path, 1.0)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        scale, group = self._scales[index], self._group_of[index]
        if scale != 1.0:
            learning_rate = keras.ops.multiply(learning_rate, scale)
        if group >= 0:
            trains = keras.ops.less(group, self.unfrozen_groups)
            learning_rate = keras.ops.multiply(learning_rate,
                                               keras.ops.cast(trains, learning_rate.dtype))
            gradient = keras.ops.multiply(gradient, keras.ops.cast(trains, gradient.dtype))
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "multipliers": dict(self.multipliers),
                "groups": dict(self.groups)}


def _register(base):
    cls = type(f"Layerwise{base.__name__}", (_LayerwiseMixin, base), {
        "__doc__": f"`keras.optimizers.{base.__name__}` with a learning rate per variable group "
                   "(see `tlkeras.optimizers.layerwise`).",
        "__module__": __name__,
    })
    return keras.saving.register_keras_serializable(package="tlkeras")(cls)


LayerwiseAdam = _register(keras.optimizers.Adam)
LayerwiseAdamW = _register(keras.optimizers.AdamW)
LayerwiseSGD = _register(keras.optimizers.SGD)
LayerwiseRMSprop = _register(keras.optimizers.RMSprop)
_CLASSES = {c.__mro__[2]: c for c in (LayerwiseAdam, LayerwiseAdamW, LayerwiseSGD, LayerwiseRMSprop)}


def layerwise(optimizer, multipliers=None, groups=None):
    """The `Layerwise*` twin of a Keras `optimizer`, with per-variable learning-rate factors.

    Args:
        optimizer: an unbuilt `keras.optimizers.Adam`, `AdamW`, `SGD` or `RMSprop`
            (its whole config, learning-rate schedule and `use_ema` included, is kept).
        multipliers: `{variable.path: factor}`; other variables keep factor 1.
        groups: `{variable.path: group}`, group 0 the first to train; only groups
            below the optimizer's `unfrozen_groups` variable move (see
            `GradualUnfreezing`). Variables not listed always train.
    """
    cls = _CLASSES.get(type(optimizer)) or (type(optimizer) if isinstance(optimizer, _LayerwiseMixin)
                                           else None)
    if cls is None:
        raise ValueError(
            "layer_decay / gradual_unfreeze need a Keras Adam, AdamW, SGD or RMSprop optimizer, "
            f"received {type(optimizer).__name__}. Pass optimizer='adam' (or 'adamw', 'sgd', "
            "'rmsprop'), or a callable returning one of these.")
    config = optimizer.get_config()
    config.pop("multipliers", None), config.pop("groups", None)
    learning_rate = optimizer._learning_rate  # a schedule stays a schedule
    config["learning_rate"] = learning_rate if isinstance(
        learning_rate, keras.optimizers.schedules.LearningRateSchedule) else config["learning_rate"]
    return cls(**config, multipliers=multipliers, groups=groups)


def block_groups(model, depth="all", unit="blocks"):
    """The trainable variable paths of the top `depth` blocks (or layers) of the base, top first.

    Returns a list of lists of `variable.path`; BatchNormalization (always frozen) is left out.
    """
    base = models.get_base(model)
    units = models.base_blocks(base) if unit == "blocks" else [
        (layer.name, [layer]) for layer in models._base_layers(base)]
    depth = len(units) if depth == "all" else depth
    groups = []
    for _, layers in reversed(units[len(units) - depth:] if depth else []):
        paths = [w.path for layer in layers if not isinstance(layer, keras.layers.BatchNormalization)
                 for w in layer.weights if w.trainable]
        if paths:
            groups.append(paths)
    return groups


def group_multipliers(groups, layer_decay):
    """`{path: factor}` for `groups` (top first): `layer_decay ** i` for group i, or a list.

    `layer_decay` is a float in (0, 1] (0.7: each block down trains at 0.7x the
    rate of the one above; the head keeps 1), or a list of factors, top group first.
    """
    if layer_decay is None:
        return {}
    if isinstance(layer_decay, (list, tuple)):
        if len(layer_decay) != len(groups):
            raise ValueError(
                f"layer_decay: expected one factor per unfrozen group ({len(groups)}, top first), "
                f"received {len(layer_decay)} factors.")
        factors = [float(f) for f in layer_decay]
    else:
        if not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
            raise ValueError(f"Expected layer_decay to be a float in (0, 1] or a list of floats, "
                             f"received layer_decay={layer_decay!r}.")
        factors = [float(layer_decay) ** i for i in range(len(groups))]
    return {path: f for paths, f in zip(groups, factors) for path in paths}


class GradualUnfreezing(keras.callbacks.Callback):
    """ULMFiT's gradual unfreezing: one more group trains every `epochs_per_group` epochs.

    Works with a `layerwise` optimizer given `groups`: in the first epoch of
    the phase (`initial_epoch`) the top group trains, then the top two, and so on.
    """

    def __init__(self, epochs_per_group=1, initial_epoch=0):
        super().__init__()
        if not isinstance(epochs_per_group, int) or epochs_per_group < 1:
            raise ValueError(f"Expected gradual_unfreeze to be an int >= 1 (epochs per block group) "
                             f"or True, received {epochs_per_group!r}.")
        self.epochs_per_group, self.initial_epoch = epochs_per_group, initial_epoch

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        optimizer.unfrozen_groups.assign(1 + (epoch - self.initial_epoch) // self.epochs_per_group)


def fine_tuning_setup(model, optimizer, depth="all", unit="blocks", *, layer_decay=None,
                      gradual_unfreeze=None, ema=False, initial_epoch=0):
    """Phase 2's optimizer and extra callbacks for `tlkeras.fine_tune`'s options.

    Call after unfreezing `depth` `unit`s of `model`'s base, with the phase's
    optimizer (unbuilt). `layer_decay` and `gradual_unfreeze` work per group
    of `block_groups`; `ema=True` turns on the optimizer's `use_ema` and adds
    `keras.callbacks.SwapEMAWeights`, so validation, the best checkpoint and
    the final weights are the averaged ones. Returns `(optimizer, callbacks)`;
    put the callbacks first (before checkpoints).
    """
    callbacks = []
    if layer_decay is not None or gradual_unfreeze:
        groups = block_groups(model, depth, unit)
        gates = {path: i for i, paths in enumerate(groups) for path in paths} if gradual_unfreeze else {}
        optimizer = layerwise(optimizer, group_multipliers(groups, layer_decay), gates)
        if gradual_unfreeze:
            callbacks.append(GradualUnfreezing(1 if gradual_unfreeze is True else gradual_unfreeze,
                                               initial_epoch))
    if ema:
        optimizer.use_ema = True
        callbacks.append(_ResumableSwapEMAWeights(initial_epoch))
    return optimizer, callbacks


class _ResumableSwapEMAWeights(keras.callbacks.SwapEMAWeights):
    """`SwapEMAWeights(swap_on_epoch=True)` that knows the state a resumed run starts in.

    The run folder's backup is written at an epoch's end, after this callback
    swapped the averaged weights into the model (the optimizer's averages
    then hold the raw weights). A run resumed from it starts at a later epoch
    than the phase's first, in that state: its first epoch swaps back, so
    training goes on from the raw weights and the averages keep averaging.
    """

    def __init__(self, initial_epoch=0):
        super().__init__(swap_on_epoch=True)
        self.initial_epoch = initial_epoch
        self._first_epoch = True

    def on_train_begin(self, logs=None):
        self._first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self._first_epoch = False
            self._ema_weights_in_model = epoch > self.initial_epoch  # restored from a backup
        super().on_epoch_begin(epoch, logs)
