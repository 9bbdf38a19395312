"""Two-phase fine-tuning: train the head on a frozen base, then unfreeze and fine-tune.

`fine_tune` is the one high-level call; it is built from pieces you can also
use alone: `tlkeras.extract_features` (phase 1 on cached features),
`tlkeras.unfreeze`, `resolve_precision`, `resolve_strategy` and
`tlkeras.callbacks.tensorboard_callbacks`.

Example:

>>> import keras, numpy as np, tlkeras
>>> x = np.random.default_rng(0).uniform(0, 255, (32, 16, 16, 3)).astype("float32")
>>> train = tlkeras.data.from_arrays(x, np.arange(32) % 2, batch_size=8, seed=0)
>>> base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3)], name="tiny")
>>> model = tlkeras.build_transfer_model(base, num_classes=2)
>>> result = tlkeras.fine_tune(model, train, head_epochs=2, fine_tune_epochs=1,
...                            run_dir="runs/tiny", verbose=0)
>>> len(result.history["loss"]), sorted(result.paths)[:2]
(3, ['checkpoints', 'config.json'])

A run folder (`run_dir`) holds `config.json` (every argument), `history.csv`
(both phases on one epoch axis), `checkpoints/best.weights.h5`,
`model.keras` and TensorBoard logs under `logs/`. Started again with the same
`run_dir`, a killed run resumes where it stopped, in either phase.
"""

import csv
import dataclasses
import json
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf

from tlkeras import anatomy, atomic, augmentation, data, deprecation, features, models, phases
from tlkeras import cutpoint, lr_finder, mixing, optimizers, runs, validation
from tlkeras import callbacks as tb
from tlkeras.phases import (  # noqa: F401 - public here too
    _SparseSmoothedCrossentropy,
    loss_and_metrics,
    make_optimizer,
)

logger = logging.getLogger("tlkeras")

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
_PHASE1_DONE = "phase1.weights.h5"


@dataclasses.dataclass
class FineTuneResult:
    """What `fine_tune` did: the trained model, both phases' history and the files written."""

    model: keras.Model
    history: dict  # metric name -> values, one per epoch over both phases
    head_epochs: int
    fine_tune_epochs: int
    log_dir: str | None = None
    paths: dict = dataclasses.field(default_factory=dict)
    precision: str = "float32"
    used_feature_cache: bool = False

    @property
    def run_dir(self):
        """The run folder (also `log_dir`, its old name)."""
        return self.log_dir

    @property
    def epochs(self):
        return self.head_epochs + self.fine_tune_epochs


def fine_tune(
    model,
    train_data,
    validation_data=None,
    *,
    head_epochs=5,
    fine_tune_epochs=5,
    unfreeze=phases.UNFREEZE,
    unfreeze_unit="blocks",
    head_learning_rate=1e-3,
    fine_tune_learning_rate=None,
    optimizer="adam",
    warmup_epochs=1,
    label_smoothing=0.0,
    class_weight=None,
    metrics=None,
    run_dir=None,
    precision="auto",
    strategy=None,
    jit_compile=False,
    cache_features="auto",
    early_stopping=None,
    callbacks=(),
    class_names=None,
    seed=None,
    verbose=1,
    layer_decay=None,
    gradual_unfreeze=None,
    ema=False,
    mix=None,
    cache_activations="auto",
    tensorboard=None,
    learning_rate=None,
    log_dir=None,
):
    """Trains a `build_transfer_model` model in two phases; returns a `FineTuneResult`.

    Phase 1 trains the head with the base frozen, at `head_learning_rate`. With
    no augmentation (none in the model, no random ops in `train_data`'s pipeline:
    `tlkeras.augmentation.is_augmented`), it
    runs the base once and trains the head on cached features, so its epochs
    cost almost nothing. Phase 2 unfreezes the top `unfreeze` blocks (or
    layers, or `"all"`) and trains at `fine_tune_learning_rate` with a linear
    warm-up over `warmup_epochs` then cosine decay: a small, smoothly
    decaying step keeps the pretrained features from being wrecked by the
    first large gradients. BatchNormalization stays in inference mode.

    Args:
        model: a model from `tlkeras.build_transfer_model` (trained in place).
        train_data: a `tf.data.Dataset` of `(images, labels)` batches.
        validation_data: the same for validation; monitored by checkpoints.
        head_epochs, fine_tune_epochs: epochs of each phase (either may be 0).
        unfreeze: depth for phase 2, an int or `"all"` (default 2: the top two
            blocks, which with the cut-point cache cost about a fifth of
            unfreezing everything; `"all"` is the Keras guide's depth, 0.02-0.07
            more accurate on the measured tasks at 4-5x the time).
        unfreeze_unit: `"blocks"` (the architecture's own blocks) or `"layers"`.
        head_learning_rate: phase 1 learning rate (default 1e-3, Adam's usual), or
            `"find"`: `tlkeras.lr_find`'s suggestion with the base frozen.
        fine_tune_learning_rate: phase 2 peak learning rate; default
            `head_learning_rate / 5` (2e-4 with the default head rate; on the
            measured tasks it beat `/ 20` at every depth tried, and the warm-up
            and BatchNorm kept frozen make it safe). `"find"`:
            `tlkeras.lr_find`'s suggestion for phase 2's trainable part,
            measured after phase 1.
        optimizer: `"adam"`, `"adamw"`, `"sgd"` (momentum 0.9), `"rmsprop"`, or
            a callable `learning_rate -> keras.optimizers.Optimizer`.
        warmup_epochs: phase 2 warm-up length (at most a tenth of the phase; see
            `tlkeras.phases.fine_tune_schedule`).
        label_smoothing: for multiclass and binary cross-entropy.
        class_weight: dict, or `"balanced"` (computed from `train_data`).
        metrics: defaults by task (accuracy for classification, MAE for regression).
        run_dir: the run folder; `None` writes nothing and cannot resume.
        precision: `"auto"` (mixed_float16 on NVIDIA GPUs of compute capability
            7.0+, float32 otherwise), `"float32"`, `"mixed_float16"`,
            `"mixed_bfloat16"`. The output stays float32; the global policy is
            restored afterwards.
        strategy: `None`/`"auto"` (one device, or `MirroredStrategy` over
            several GPUs), `"multiworker"` (`MultiWorkerMirroredStrategy` from
            `TF_CONFIG`), or a `tf.distribute.Strategy`.
        jit_compile: XLA-compile the train step.
        cache_features: `"auto"`, `True` or `False` for phase 1 (`"auto"`: on when
            there is no augmentation and no distribution strategy).
        early_stopping: patience in epochs (per phase), or `None`.
        callbacks: more Keras callbacks, used in both phases.
        class_names: for TensorBoard images and `config.json`; defaults to
            `train_data.class_names`.
        seed: makes weight init of new variables and shuffling repeatable.
        verbose: Keras `fit` verbosity.
        layer_decay: discriminative learning rates in phase 2 (see
            `tlkeras.optimizers`): each unfrozen block (or layer) group down
            from the top trains at `layer_decay` times the rate of the one
            above (the head at the full rate), or a list of factors, top first.
        gradual_unfreeze: `True` or N: phase 2 starts with the top group
            training and adds the next group down every N epochs (ULMFiT).
        ema: keep an exponential moving average of the weights in phase 2
            (optimizer `use_ema`); validation, checkpoints and the returned
            model use the averaged weights.
        mix: `"mixup"` or `"cutmix"` (`keras.layers.MixUp` / `CutMix`, see
            `tlkeras.mixing`): phase 2 trains on mixed batches with soft labels
            (multiclass only). They run in the input pipeline, so no exported
            model holds them.
        cache_activations: phase 2 with the top `unfreeze` blocks trainable
            runs the frozen part below them once and trains the top on its
            cached float16 activations (`tlkeras.cutpoint`); phase 1's head
            features then come from the same activations (one pass of the
            frozen part for both phases). `"auto"`: when there is a single
            cut, no augmentation and no distribution strategy; `True`: an
            error otherwise; `False`: never.
        tensorboard: more arguments of `tlkeras.callbacks.tensorboard_callbacks`
            for the run's logs, e.g. `{"every_n_epochs": 5, "hparams": {...}}`:
            `hparams` (default: the scalar arguments above, as in
            `config.json`) to give an experiment's runs one HParams table of
            its own variables; the trial id defaults to the run folder's name.
        learning_rate, log_dir: deprecated names of `head_learning_rate`, `run_dir`.
    """
    if learning_rate is not None:
        head_learning_rate = deprecation.renamed("fine_tune", "learning_rate", learning_rate,
                                                 "head_learning_rate")
    if log_dir is not None:
        run_dir = deprecation.renamed("fine_tune", "log_dir", log_dir, "run_dir")
    learning_rate, log_dir = head_learning_rate, run_dir
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if precision not in PRECISIONS:
        raise ValueError(f"Expected precision in {PRECISIONS}, received precision={precision!r}.")
    for argument, value in (("head_epochs", head_epochs), ("fine_tune_epochs", fine_tune_epochs)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"Expected {argument} to be an int >= 0, received {argument}={value!r}.")
    if learning_rate == "find":  # the learning-rate range test, phase 1's setting (base frozen)
        learning_rate = lr_finder.lr_find(model, train_data, phase="head", optimizer=optimizer,
                                          log_dir=log_dir and os.fspath(log_dir),
                                          verbose=verbose).suggestion
    validation.check_positive(learning_rate=learning_rate)
    if fine_tune_learning_rate != "find":
        validation.check_positive(fine_tune_learning_rate=fine_tune_learning_rate)
    if isinstance(optimizer, str):
        make_optimizer(optimizer, learning_rate)  # an unknown name fails before anything runs
    train_data = validation.check_model_data(model, train_data, name="train_data")
    if validation_data is not None:
        validation_data = validation.check_model_data(model, validation_data,
                                                      name="validation_data")
    fine_tune_learning_rate = fine_tune_learning_rate or learning_rate / 5
    task = anatomy.infer_task(model)
    class_names = class_names or getattr(train_data, "class_names", None)
    if isinstance(class_weight, str):
        class_weight = data.class_weights(train_data, class_weight)
    config = {
        "base": models.get_base(model).name,
        "task": task,
        "input_shape": list(model.input_shape[1:]) if isinstance(model.input_shape, tuple) else None,
        "outputs": model.output_shape[-1] if isinstance(model.output_shape, tuple) else None,
        "head_epochs": head_epochs, "fine_tune_epochs": fine_tune_epochs,
        "unfreeze": unfreeze, "unfreeze_unit": unfreeze_unit,
        "learning_rate": learning_rate, "fine_tune_learning_rate": fine_tune_learning_rate,
        "optimizer": optimizer if isinstance(optimizer, str) else repr(optimizer),
        "warmup_epochs": warmup_epochs, "label_smoothing": label_smoothing,
        "class_weight": class_weight, "precision": resolve_precision(precision),
        "strategy": strategy if strategy is None or isinstance(strategy, str) else type(strategy).__name__,
        "jit_compile": jit_compile, "cache_features": cache_features,
        "early_stopping": early_stopping, "seed": seed, "class_names": class_names,
        "layer_decay": layer_decay, "gradual_unfreeze": gradual_unfreeze, "ema": ema, "mix": mix,
        "cache_activations": cache_activations,
    }
    run = _RunFolder(log_dir, config, tensorboard)
    policy = config["precision"]
    strategy = resolve_strategy(strategy)
    previous_policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy(policy)
        working = _prepare(model, policy, strategy)
        run.restore_phase1(working)
        with strategy.scope():
            cut = None  # phase 2 on the cut-point cache: one frozen-part pass serves both phases
            if head_epochs and fine_tune_epochs and cache_features and not run.phase1_done:
                cut = cutpoint.cut_point(
                    working, train_data, validation_data, unfreeze, unfreeze_unit,
                    cache_activations, augmented=_augmented(working, train_data, mix),
                    distributed=tf.distribute.has_strategy(),
                    cache_dir=run.sub("activation_cache"), verbose=verbose)
            used_cache = _phase1(
                working, train_data, validation_data, run, head_epochs, learning_rate, optimizer,
                label_smoothing, class_weight, metrics, jit_compile, cache_features, early_stopping,
                callbacks, class_names, verbose, task, cut,
            )
            if fine_tune_learning_rate == "find":  # after phase 1, as phase 2 will train
                fine_tune_learning_rate = lr_finder.lr_find(
                    working, train_data, phase="fine_tune", unfreeze=unfreeze,
                    unfreeze_unit=unfreeze_unit, optimizer=optimizer, log_dir=run.path,
                    verbose=verbose).suggestion
            _phase2(
                working, train_data, validation_data, run, head_epochs, fine_tune_epochs, unfreeze,
                unfreeze_unit, fine_tune_learning_rate, warmup_epochs, optimizer, label_smoothing,
                class_weight, metrics, jit_compile, early_stopping, callbacks, class_names, verbose, task,
                dict(layer_decay=layer_decay, gradual_unfreeze=gradual_unfreeze, ema=ema, mix=mix,
                     seed=seed, cache_activations=cache_activations, cut=cut),
            )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        run.release()
    if working is not model:
        _copy_weights(working, model)
        _copy_trainable(working, model)
    paths = run.finish(model)
    return FineTuneResult(model, run.history_lists(), head_epochs, fine_tune_epochs, run.path, paths,
                          policy, used_cache)


def resolve_precision(precision="auto"):
    """The dtype policy name `precision` stands for on this machine."""
    if precision != "auto":
        return precision
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        if details.get("compute_capability", (0, 0)) >= (7, 0):
            return "mixed_float16"
    return "float32"


def resolve_strategy(strategy=None):
    """`None`/`"auto"`: the default strategy, or `MirroredStrategy` on several GPUs."""
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy in (None, "auto"):
        if len(tf.config.list_logical_devices("GPU")) > 1:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.get_strategy()
    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if strategy == "multiworker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:
            raise RuntimeError(
                "strategy='multiworker' must be created before any TensorFlow op runs: create "
                "`strategy = tf.distribute.MultiWorkerMirroredStrategy()` first thing in your "
                f"program and pass strategy=strategy ({error})."
            ) from error
    raise ValueError(
        "Expected strategy to be None, 'auto', 'mirrored', 'multiworker' or a "
        f"tf.distribute.Strategy, received strategy={strategy!r}."
    )


def _phase1(model, train, val, run, epochs, lr, optimizer, smoothing, class_weight, metrics, jit,
            cache_features, patience, extra, class_names, verbose, task, cut=None):
    if epochs == 0 or run.phase1_done:
        return False
    models.freeze(model)
    augmented = _has_augmentation(model, train)
    if cache_features is True and augmented:
        raise ValueError("cache_features=True, but the training data is augmented (in the model or the "
                         "pipeline): cached features would freeze one augmentation. Use 'auto' or False.")
    distributed = tf.distribute.has_strategy()  # inside a non-default strategy's scope
    if cache_features is True and distributed:
        raise ValueError("cache_features=True is not supported with a distribution strategy; use 'auto'.")
    use_cache = bool(cache_features) and not augmented and not distributed
    fit_model, fit_train, fit_val = model, train, val
    if use_cache:
        if cut is not None:  # from phase 2's cut activations: the top blocks, then pooling
            top, *activations = cut
            pooled = [a and cutpoint.head_features(top, a, verbose=verbose) for a in activations]
        else:
            pooled = [data is not None and features.extract_features(
                model, data, cache_dir=run.sub("feature_cache"), key=key, verbose=verbose)
                for data, key in ((train, "train"), (val, "validation"))]
        fit_train = features.features_dataset(pooled[0], batch_size=phases.batch_size(train),
                                              shuffle=True)
        if val is not None:
            fit_val = features.features_dataset(pooled[1], batch_size=phases.batch_size(val),
                                                shuffle=False)
        _, fit_model = anatomy.split_model(model)
    # Many tiny head steps per call on cached features, but never more than an epoch holds (the
    # progress bar counts executions against the epoch's steps).
    per_call = min(32, phases.steps_per_epoch(fit_train)) if use_cache else 1
    phases.compile_for_task(fit_model, task, optimizer=optimizer, learning_rate=lr,
                            label_smoothing=smoothing, metrics=metrics, jit_compile=jit,
                            steps_per_execution=per_call)
    strategy = tf.distribute.get_strategy()
    if _multi_worker(strategy):
        _support_multi_worker_fit(model, strategy, train)
    cbs = run.callbacks(model, fit_model, "phase1", val, class_names, patience, extra, steps=None)
    fit_model.fit(fit_train, validation_data=fit_val, epochs=epochs, class_weight=class_weight,
                  callbacks=cbs, verbose=verbose, shuffle=False)  # tf.data shuffles itself
    _compile_like(model, fit_model, task, smoothing, metrics, jit)
    run.mark_phase1_done(model)
    return use_cache


def _phase2(model, train, val, run, head_epochs, epochs, depth, unit, lr, warmup, optimizer,
            smoothing, class_weight, metrics, jit, patience, extra, class_names, verbose, task,
            options=None):
    if epochs == 0:
        return
    models.unfreeze(model, depth, unit)
    steps = phases.steps_per_epoch(train)
    schedule = phases.fine_tune_schedule(lr, steps, epochs, warmup_epochs=warmup)
    loss, metric_list = loss_and_metrics(task, smoothing, metrics)
    options = dict(options or {})
    mix, seed = options.pop("mix", None), options.pop("seed", None)
    fit_train, fit_val, loss = mixing.phase_data(
        train, val, loss, mix, task, model.output_shape[-1], smoothing, seed)
    fit_model, fit_train, fit_val = cutpoint.phase_inputs(
        model, fit_train, fit_val, depth, unit, options.pop("cache_activations", False),
        augmented=_augmented(model, train, mix),
        distributed=tf.distribute.has_strategy(),
        cache_dir=run.sub("activation_cache"), verbose=verbose, seed=seed,
        cut=options.pop("cut", None))
    phase_optimizer, option_callbacks = optimizers.fine_tuning_setup(
        model, make_optimizer(optimizer, schedule), depth, unit, initial_epoch=head_epochs,
        **options)
    fit_model.compile(optimizer=phase_optimizer, loss=loss, metrics=metric_list, jit_compile=jit)
    strategy = tf.distribute.get_strategy()
    if _multi_worker(strategy):
        _support_multi_worker_fit(model, strategy, train)
    cbs = option_callbacks + run.callbacks(model, fit_model, "phase2", val, class_names, patience,
                                           extra, steps=steps, initial_epoch=head_epochs)
    fit_model.fit(fit_train, validation_data=fit_val, epochs=head_epochs + epochs,
                  initial_epoch=head_epochs, class_weight=class_weight, callbacks=cbs,
                  verbose=verbose, shuffle=False)  # tf.data shuffles itself
    _compile_like(model, fit_model, task, smoothing, metrics, jit)


def _compile_like(model, fit_model, task, smoothing, metrics, jit):
    """A phase that trained `model` through another model (cached features, cut activations)
    leaves it compiled with that optimizer, loss and metrics: `model.evaluate` works, and
    `model.optimizer` is the one that trained it (with its EMA, if on)."""
    if fit_model is not model:
        loss, metric_list = loss_and_metrics(task, smoothing, metrics)
        model.compile(optimizer=fit_model.optimizer, loss=loss, metrics=metric_list,
                      jit_compile=jit)


class _RunFolder:
    """The run folder: config, history, checkpoints, resume state."""

    def __init__(self, path, config, tensorboard=None):
        self.path = os.path.abspath(path) if path else None
        self.config = config
        self.tensorboard = dict(tensorboard or {})
        self.rows = {}
        self.best = None
        self.monitor = None
        if not self.path:
            return
        self.is_chief = _is_chief()
        if not self.is_chief:  # other workers write their state beside the chief's
            self.path = os.path.join(self.path, f"worker_{_task_id()}")
        self.lock = runs.RunLock(self.path).acquire()  # before anything is read or written
        try:
            runs.check_resume(self.path, config)
        except runs.RunFolderMismatchError:
            self.release()
            raise
        os.makedirs(self.sub("checkpoints"), exist_ok=True)
        config_path = os.path.join(self.path, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                previous = json.load(f)
            changed = {k for k in config if json.dumps(config[k], default=str) != json.dumps(previous.get(k), default=str)}
            if changed:
                logger.warning("log_dir %s holds a run with other arguments (%s); resuming it anyway.",
                               self.path, ", ".join(sorted(changed)))
        atomic.write_json(config_path, config)
        history = os.path.join(self.path, "history.csv")
        if os.path.exists(history):
            with open(history) as f:
                for row in csv.DictReader(f):
                    epoch = int(row.pop("epoch"))
                    self.rows[epoch] = {k: float(v) for k, v in row.items() if v != ""}

    def release(self):
        if getattr(self, "lock", None):
            self.lock.release()
            self.lock = None

    def sub(self, name):
        return os.path.join(self.path, name) if self.path else None

    @property
    def phase1_done(self):
        return bool(self.path) and os.path.exists(os.path.join(self.sub("checkpoints"), _PHASE1_DONE))

    def restore_phase1(self, model):
        if self.phase1_done:
            logger.info("Phase 1 already done in %s; resuming with phase 2.", self.path)
            model.load_weights(os.path.join(self.sub("checkpoints"), _PHASE1_DONE))

    def mark_phase1_done(self, model):
        if self.path:
            with atomic.path(os.path.join(self.sub("checkpoints"), _PHASE1_DONE)) as tmp:
                model.save_weights(tmp)

    def callbacks(self, model, fit_model, phase, val, class_names, patience, extra, steps, initial_epoch=0):
        monitor = "val_loss" if val is not None else "loss"
        cbs = [validation.NonFiniteLossGuard(self.path),
               _HistoryRecorder(self, initial_epoch_of_phase=initial_epoch)]
        if patience:
            cbs.append(keras.callbacks.EarlyStopping(monitor, patience=patience, restore_best_weights=True))
        if self.path:
            cbs.append(_BestCheckpoint(self, model, monitor))
            cbs.append(_ResumableBackup(os.path.join(self.sub("backup"), phase), initial_epoch, steps))
            hparams = {k: v for k, v in self.config.items() if isinstance(v, (int, float, str, bool))}
            images = len(model.inputs[0].shape) == 4  # no image grids for text models
            tb_callbacks = tb.tensorboard_callbacks(
                self.sub("logs"), validation_data=val if images else None, class_names=class_names,
                **{"hparams": hparams, "trial_id": os.path.basename(self.path), **self.tensorboard})
            cbs += [cb if fit_model is model or isinstance(cb, keras.callbacks.TensorBoard)
                    else _OnModel(cb, model) for cb in tb_callbacks]
        return cbs + list(extra)

    def record(self, epoch, logs):
        self.rows[epoch] = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
        if self.path:
            keys = sorted({k for row in self.rows.values() for k in row})
            with atomic.path(os.path.join(self.path, "history.csv")) as tmp:
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, ["epoch", *keys])
                    writer.writeheader()
                    for e in sorted(self.rows):
                        writer.writerow({"epoch": e, **self.rows[e]})

    def history_lists(self):
        keys = sorted({k for row in self.rows.values() for k in row})
        return {k: [self.rows[e].get(k, math.nan) for e in sorted(self.rows)] for k in keys}

    def finish(self, model):
        if not self.path:
            return {}
        paths = {name: self.sub(name) for name in ("config.json", "history.csv", "checkpoints", "logs")}
        if self.is_chief:
            paths["model.keras"] = self.sub("model.keras")
            with atomic.path(paths["model.keras"]) as tmp:
                model.save(tmp)
        return {k: v for k, v in paths.items() if os.path.exists(v)}


class _HistoryRecorder(keras.callbacks.Callback):
    def __init__(self, run, initial_epoch_of_phase=0):
        super().__init__()
        self.run = run

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and "learning_rate" not in logs:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        self.run.record(epoch, logs)


class _BestCheckpoint(keras.callbacks.Callback):
    """Saves the full model's weights whenever `monitor` improves, across both phases."""

    def __init__(self, run, model, monitor):
        super().__init__()
        self.run, self.full_model, self.monitor = run, model, monitor

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        best = min((row[self.monitor] for e, row in self.run.rows.items() if e < epoch and self.monitor in row),
                   default=math.inf)
        if value <= best:
            with atomic.path(os.path.join(self.run.sub("checkpoints"), "best.weights.h5")) as tmp:
                self.full_model.save_weights(tmp)


class _ResumableBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that also restores the learning-rate schedule's position."""

    def __init__(self, backup_dir, initial_epoch, steps_per_epoch):
        super().__init__(backup_dir, double_checkpoint=True, delete_checkpoint=False)
        self.phase_start, self.steps = initial_epoch, steps_per_epoch

    def _load_model(self):
        super()._load_model()
        epoch = getattr(self.model, "_initial_epoch", None)
        if epoch and epoch > self.phase_start:
            logger.warning("Resuming from the backup in %s at epoch %d.", self.backup_dir, epoch)
            if self.steps:
                optimizer = self.model.optimizer
                if not optimizer.built:
                    optimizer.build(self.model.trainable_variables)
                optimizer.iterations.assign((epoch - self.phase_start) * self.steps)


class _OnModel(keras.callbacks.Callback):
    """Runs `callback` against `model` whatever `fit` trains (phase 1 may train the head alone)."""

    def __init__(self, callback, model):
        super().__init__()
        self.callback = callback
        callback.set_model(model)

    def set_model(self, model):
        pass

    def on_train_begin(self, logs=None):
        self.callback.on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        self.callback.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        self.callback.on_train_end(logs)


def _multi_worker(strategy):
    from keras.src.backend.tensorflow import trainer

    return trainer._collective_all_reduce_multi_worker(strategy)


def _support_multi_worker_fit(model, strategy, dataset):
    """Works around Keras 3 `fit` failing under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    Keras reduces a *distributed* batch to build the model's metrics, and averages
    scalar metrics over axis 0; both fail across workers. This builds from a local batch
    and averages scalars across replicas. It only acts under multi-worker strategies.
    """
    from keras.src.backend.tensorflow import trainer

    if not getattr(trainer.reduce_per_replica, "_tlkeras", False):
        original = trainer.reduce_per_replica

        def reduce_per_replica(values, strategy, reduction):
            if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
                return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
            return original(values, strategy, reduction)

        reduce_per_replica._tlkeras = True
        trainer.reduce_per_replica = reduce_per_replica
    batch = next(iter(dataset))

    def build(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=batch)

    model._maybe_symbolic_build = build


def _prepare(model, policy, strategy):
    """The model to train: `model` itself, or a copy rebuilt under `policy` / in `strategy`."""
    base = models.get_base(model) if "features" in {layer.name for layer in model.layers} else model
    same_policy = base.dtype_policy.name == policy
    default_strategy = not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()
    if same_policy and default_strategy:
        return model
    config = model.get_config()
    _set_policy(config, policy)
    try:
        with strategy.scope():
            working = model.__class__.from_config(config)
    except Exception as error:
        raise ValueError(
            f"precision={policy!r} / strategy {type(strategy).__name__} need the model rebuilt from its "
            f"config, which failed ({error}). Build the model inside `strategy.scope()` and after "
            "keras.mixed_precision.set_global_policy(...) instead."
        ) from error
    _copy_weights(model, working)
    _copy_trainable(model, working)
    return working


def _set_policy(config, policy):
    """Sets every float32 layer dtype in a model config to `policy`, except the float32 ends."""
    if isinstance(config, dict):
        if (config.get("name") not in anatomy.FLOAT32_LAYERS
                and isinstance(config.get("dtype"), dict)):
            dtype = config["dtype"]
            if dtype.get("class_name") == "DTypePolicy" and dtype["config"].get("name") == "float32":
                dtype["config"]["name"] = policy
        for value in config.values():
            _set_policy(value, policy)
    elif isinstance(config, list):
        for value in config:
            _set_policy(value, policy)


def _copy_weights(source, target):
    target.set_weights(source.get_weights())


def _copy_trainable(source, target):
    for a, b in zip(source._flatten_layers(), target._flatten_layers()):
        b.trainable = a.trainable


_has_augmentation = augmentation.is_augmented  # the model's layer, or random ops in the data


def _augmented(model, train, mix):
    """Whether phase 2 sees other inputs each epoch (augmentation or mix=): no cut-point cache."""
    return bool(mix) or _has_augmentation(model, train)


_batch_size = phases.batch_size  # old private names
_steps_per_epoch = phases.steps_per_epoch


def _is_chief():
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    return task.get("type", "chief") == "chief" or (task.get("type") == "worker" and task.get("index", 0) == 0
                                                     and "chief" not in config.get("cluster", {}))


def _task_id():
    task = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("task", {})
    return f"{task.get('type', 'worker')}{task.get('index', 0)}"
