"""Keras Tuner search over how deep to unfreeze, at what learning rate: cheap, resumable, visible.

`tune` answers "how many blocks of the base should fine-tuning unfreeze, at
what learning rate, with what dropout (and head width)?" in one call. It is
two-phase fine-tuning (`tlkeras.fine_tune`) split so that a search costs
little more than its trials' fine-tuning:

- Phase 1 (the head on the frozen base) runs once per search: the base's
  features of the training and validation data are computed once
  (`tlkeras.extract_features`, cached in the search directory) and the head
  is trained on them; its weights are saved in the directory. A head width
  in the search space changes the head's shape, so phase 1 then trains one
  head per distinct width, on the same cached features; dropout does not
  (phase 1 uses the dropout space's default value, each trial its own).
- Every trial takes the model built once per search (its base restored to
  the pretrained weights, a head of the trial's shape), loads that head and runs
  phase 2 only: unfreeze its depth (in the architecture's blocks, see
  `tlkeras.models.base_blocks`), fine-tune at its learning rate (linear
  warm-up, then cosine decay: `tlkeras.phases.fine_tune_schedule`, as in
  `fine_tune`).
  Hyperband's epoch budget is the number of fine-tune epochs; a Hyperband
  trial that continues an earlier one starts from that trial's checkpoint.
- Without augmentation, a trial's phase 2 runs the frozen part of the base
  once per depth, not every epoch (`cache_activations`): depth 0 trains the
  head on phase 1's cached features, depth k the top k blocks on the
  float16 activations below them (`tlkeras.cutpoint`, cached in
  `activations/`, keyed on the frozen weights and the data, shared by every
  trial of that depth). The trial table's `cached` column says which trials
  did; their objective equals recomputing's to float16 rounding.

Example:

>>> import keras, numpy as np, tensorflow as tf, tlkeras
>>> images = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 3)).astype("float32")
>>> train_ds = tf.data.Dataset.from_tensor_slices((images, np.arange(16) % 2)).batch(8)
>>> base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv")])
>>> result = tlkeras.tune(base, train_ds, train_ds, num_classes=2, tuner="random",
...                       max_trials=1, max_epochs=1, head_epochs=1, run_dir="tuning/tiny",
...                       verbose=0)
>>> sorted(result.best_hyperparameters)
['dropout', 'fine_tune_learning_rate', 'unfreeze']
>>> result.best_model.predict(images, verbose=0).shape
(16, 2)

Search space: by default `unfreeze` (a choice over the base's block
boundaries, 0 = head only ... every block), `fine_tune_learning_rate` (phase 2 peak,
1e-5 to 1e-3, log scale) and `dropout` (0 to 0.5). Narrow or extend it with a
dict; each value is a list (a choice), a constant, or a callable `hp -> value`
using any Keras Tuner hyperparameter; the keys are `SEARCH_SPACE_KEYS`:

>>> space = {
...     "unfreeze": [0, 2, 4],
...     "fine_tune_learning_rate": lambda hp: hp.Float(
...         "fine_tune_learning_rate", 1e-5, 1e-4, sampling="log"),
...     "dropout": 0.3,                 # fixed
...     "head_units": [0, 128, 256],    # one phase-1 head per width
...     "optimizer": ["adam", "sgd"]}
>>> sorted(space) == sorted(set(SEARCH_SPACE_KEYS) - {"label_smoothing"})
True

or pass a callable `hp -> dict` that declares the whole space itself.

Run folder (`run_dir`): Keras Tuner's own files (
`oracle.json`, `trial_<id>/trial.json` and `checkpoint.weights.h5`),
`features/` (the cached base features), `phase1/` (the trained heads),
`logs/trial_<id>/` (TensorBoard: loss and metric curves, and the trial's
hyperparameters for the HParams dashboard: `tensorboard --logdir
<run_dir>/logs`), `trials.csv` and
`best_hyperparameters.json`.

Resuming: run the same call again with `overwrite=False` (the default) after an
interruption. Finished trials are not repeated (Keras Tuner reloads its
oracle; a trial that was running is run again), and neither is phase 1 or the
feature extraction.

Distributed search: Keras Tuner's own. Start the same script on each machine
with these environment variables (all processes must see the same
`directory`, e.g. a shared disk, to exchange the heads and checkpoints):

    export KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000
    KERASTUNER_TUNER_ID=chief python search.py    # on the chief's machine
    KERASTUNER_TUNER_ID=tuner0 python search.py   # on each worker: tuner0, tuner1, ...

The chief only serves the oracle (over gRPC, the `grpcio` package) and
returns when every trial is done, with the best model (and its export); a
worker runs trials and returns the trial table, without the best model. Each
worker that needs phase 1 computes the features once (or finds them in the
shared directory); workers never pass `overwrite=True` on.
"""

import copy
import csv
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import time

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from tlkeras import (anatomy, atomic, cutpoint, deprecation, features, models, phases,
                     validation)
from tlkeras import augmentation as augmentation_module  # `augmentation` is an argument
from tlkeras import callbacks as tb
from tlkeras.export import export_model

logger = logging.getLogger("tlkeras")

TUNERS = {
    "hyperband": kt.Hyperband,
    "bayesian": kt.BayesianOptimization,
    "random": kt.RandomSearch,
    "grid": kt.GridSearch,
}
SEARCH_SPACE_KEYS = ("unfreeze", "fine_tune_learning_rate", "dropout", "head_units", "optimizer",
                     "label_smoothing")


@dataclasses.dataclass
class TuneResult:
    """What `tune` found.

    Attributes:
        best_hyperparameters: the best trial's values (`unfreeze`, ...).
        best_score: its objective value.
        best_model: the best trial's model, restored at its best epoch (None
            on a distributed-search worker).
        trials: one dict per trial: `trial_id`, `status`, the
            hyperparameters, the objective, `epochs` and `seconds`.
        csv_path: the same table as CSV.
        directory: the search's folder, `run_dir` (also as `.run_dir`).
        tuner: the `keras_tuner.Tuner`.
        export: the `tlkeras.export_model` result when `export_dir` was given.
    """

    best_hyperparameters: dict
    best_score: float
    best_model: keras.Model | None
    trials: list
    csv_path: str
    directory: str
    tuner: kt.Tuner
    export: object = None

    @property
    def run_dir(self):
        return self.directory


def tune(
    base_or_model,
    train_data,
    validation_data,
    *,
    num_classes=None,
    task="multiclass",
    input_shape=None,
    weights="imagenet",
    augmentation=None,
    search_space=None,
    tuner="hyperband",
    max_trials=10,
    max_epochs=3,
    objective="val_accuracy",
    run_dir=os.path.join("tuning", "tlkeras"),
    overwrite=False,
    head_epochs=5,
    head_learning_rate=1e-3,
    callbacks=(),
    export_dir=None,
    export_formats=("keras",),
    seed=None,
    verbose=1,
    cache_activations="auto",
    directory=None,
    project_name=None,
    **tuner_kwargs,
):
    """Searches unfreeze depth, learning rate, dropout (...) of a transfer model.

    Args:
        base_or_model: a backbone name, a `keras.Model` base, or a model from
            `tlkeras.build_transfer_model` (its head is rebuilt per trial).
        train_data, validation_data: `tf.data.Dataset`s of `(images, labels)`
            batches, not augmented (phase 1 caches features of the images).
        num_classes, task, input_shape, weights, augmentation: as in
            `build_transfer_model`, when `base_or_model` is a base;
            `input_shape` defaults to the data's. Augmentation in the model
            acts in phase 2 only (phase 1 trains on features of the images).
        search_space: `None` (the default space), a dict of overrides, or a
            callable `hp -> dict` (see the module docstring).
        tuner: `"hyperband"`, `"bayesian"`, `"random"` or `"grid"`.
        max_trials: the most trials to run (Hyperband: a cap on its own
            schedule; `None` lets it run its full schedule).
        max_epochs: fine-tune epochs per trial (Hyperband: its `max_epochs`).
        objective: the metric to optimize, e.g. `"val_accuracy"`, `"val_loss"`.
        run_dir: the search's folder (Keras Tuner's files, features, heads, logs).
        overwrite: start afresh instead of resuming a search found there.
        head_epochs, head_learning_rate: phase 1 (Adam on the cached features).
        callbacks: more Keras callbacks for every trial's phase 2.
        export_dir: export the best model there with `tlkeras.export_model`.
        export_formats: the formats to export.
        seed: makes the search repeatable: seeds the tuner (with `seed + 1`: Keras
            Tuner takes 0 for no seed), the head's initial weights and shuffling.
        verbose: 0 silent, 1 Keras Tuner's and Keras' progress output.
        cache_activations: `"auto"` (the default): each trial's phase 2
            trains only the unfrozen top on cached activations of the frozen
            part when the model has no augmentation and no distribution
            strategy is in use; `False`: every trial runs the whole model on
            the images.
        directory, project_name: deprecated (Keras Tuner's names): the folder
            `directory/project_name` is `run_dir`.
        **tuner_kwargs: more arguments of the Keras Tuner class, e.g.
            `factor=3` (Hyperband) or `num_initial_points=4` (Bayesian).

    Returns:
        A `TuneResult`; the trial table is also printed (when `verbose`).
    """
    if tuner not in TUNERS:
        raise ValueError(f"Expected tuner in {sorted(TUNERS)}, received tuner={tuner!r}.")
    validation.check_search_space(search_space)  # fails fast, naming the key and the value
    validation.check_positive(head_learning_rate=head_learning_rate)
    if validation_data is None:
        raise ValueError(f"tune needs validation_data to compute objective={objective!r}.")
    for name, data in (("train_data", train_data), ("validation_data", validation_data)):
        if not hasattr(data, "element_spec"):
            raise TypeError(f"tune: expected {name} to be a tf.data.Dataset of (images, labels) "
                            f"batches, received {type(data).__name__}.")
    if augmentation_module.pipeline_is_random(train_data):
        raise ValueError("tune: train_data is augmented, but phase 1 computes the base's features "
                         "once; augment in the model instead (tune(..., augmentation=...)).")
    if directory is not None or project_name is not None:
        old = "directory" if directory is not None else "project_name"
        deprecation.renamed("tune", old, None, "run_dir")
        run_dir = os.path.join(os.fspath(directory or "tuning"), project_name or "tlkeras")
    run_dir = os.path.abspath(os.fspath(run_dir))
    directory, project_name = os.path.dirname(run_dir), os.path.basename(run_dir)
    worker = _is_distributed_worker()
    reference = _reference_model(base_or_model, train_data, num_classes, task, input_shape,
                                 weights, augmentation)
    validation.check_model_data(reference, train_data, name="train_data")
    validation.check_model_data(reference, validation_data, name="validation_data")
    project_dir = os.path.join(os.fspath(directory), project_name)
    hypermodel = TransferHyperModel(
        reference, search_space, project_dir=project_dir, head_epochs=head_epochs,
        head_learning_rate=head_learning_rate, seed=seed, cache_activations=cache_activations)
    if isinstance(base_or_model, str):  # tune built `reference` itself: no copy needed
        hypermodel._shared = reference
    kind = TUNERS[tuner]
    budget = {"max_epochs": max_epochs} if tuner == "hyperband" else {"max_trials": max_trials}
    search = kind(hypermodel, objective=objective, directory=os.fspath(directory),
                  project_name=project_name, overwrite=overwrite and not worker,
                  seed=None if seed is None else seed + 1,  # Keras Tuner takes seed 0 for None
                  **budget, **tuner_kwargs)
    if tuner == "hyperband" and max_trials is not None and not worker:
        search.oracle.max_trials = max_trials
    search.search(train_data, validation_data=validation_data, epochs=max_epochs,
                  callbacks=list(callbacks), verbose=verbose)
    return _result(search, project_dir, worker, train_data, validation_data, export_dir,
                   export_formats, verbose)


class TransferHyperModel(kt.HyperModel):
    """A Keras Tuner `HyperModel` for two-phase fine-tuning of one transfer model.

    `build(hp)` gives `reference` (one copy of it, built once and shared, its
    pretrained weights restored at each call) with a new head of the trial's shape;
    `fit(hp, model, train, validation_data=..., epochs=...)` loads the phase-1
    head (training it first, once per head shape, on features computed once)
    and runs phase 2. Works with every Keras Tuner tuner; `tune` is the
    usual way in.

    Args:
        reference: a model from `tlkeras.build_transfer_model` holding the
            pretrained base (not modified).
        search_space: see `tune`.
        project_dir: where `features/`, `phase1/` and `logs/` go.
        head_epochs, head_learning_rate, seed, cache_activations: see `tune`.
    """

    def __init__(self, reference, search_space=None, *, project_dir, head_epochs=5,
                 head_learning_rate=1e-3, seed=None, cache_activations="auto"):
        super().__init__(name="tlkeras")
        if cache_activations not in ("auto", False):
            raise ValueError("Expected cache_activations to be 'auto' or False, received "
                             f"cache_activations={cache_activations!r}.")
        self.cache_activations = cache_activations
        self.project_dir = project_dir
        self.head_epochs = head_epochs
        self.head_learning_rate = head_learning_rate
        self.seed = seed
        # Today's key names once (old ones warn here, from the caller of tune).
        self.search_space = (_new_keys(search_space) if isinstance(search_space, dict)
                             else search_space)
        self.task = anatomy.infer_task(reference)
        self._head = anatomy.head_config(reference)  # trials keep it, but for the space's changes
        self._class, self._config = reference.__class__, reference.get_config()
        self._weights = reference.get_weights()
        blocks = models.base_blocks(models.get_base(reference))
        # Depths where one more block brings weights that train (BatchNormalization never does).
        n = len(blocks)
        self.depths = [0] + [d for d in range(1, n + 1) if _trains(blocks[n - d][1])]
        hidden = self._head["hidden_units"]
        self.defaults = {"unfreeze": self.depths[-1], "fine_tune_learning_rate": 1e-4,
                         "dropout": self._head["dropout"],
                         "head_units": hidden[0] if hidden else 0, "optimizer": "adam",
                         "label_smoothing": 0.0}
        self._features = None
        self._steps = None
        self._shared = None  # the copy of `reference` below the trials' heads
        self._fresh_copies = False
        self.feature_extractions = 0  # base passes over the data in this process (phase 1)
        self.heads_trained = 0
        self.activation_builds = 0  # passes of a frozen part over the data (phase 2's cache)
        self.cuts_with_features = 0  # depths whose activations came with phase 1's features

    def values(self, hp):
        """The trial's settings: the search space's values, defaults for the rest."""
        space = self.search_space
        if callable(space):
            chosen = space(hp)
            if not isinstance(chosen, dict):
                raise kt.errors.FatalTypeError("search_space: the callable must return a dict, "
                                               f"returned {type(chosen).__name__}.")
            chosen = _new_keys(chosen)
        else:
            space = {
                "unfreeze": self.depths,
                "fine_tune_learning_rate": lambda hp: hp.Float(
                    "fine_tune_learning_rate", 1e-5, 1e-3, sampling="log",
                                                     default=1e-4),
                "dropout": lambda hp: hp.Choice("dropout", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                                                default=0.2),
                **(space or {}),
            }
            chosen = {}
            for key, spec in space.items():
                if callable(spec):
                    chosen[key] = spec(hp)
                elif isinstance(spec, (list, tuple)):
                    chosen[key] = hp.Choice(key, list(spec))
                else:
                    chosen[key] = spec
        # Fatal errors: Keras Tuner re-raises them instead of recording a failed trial.
        unknown = sorted(set(chosen) - set(SEARCH_SPACE_KEYS))
        if unknown:
            raise kt.errors.FatalValueError(
                f"search_space: unknown keys {unknown}; expected keys from {SEARCH_SPACE_KEYS}.")
        values = {**self.defaults, **chosen}
        depths = space.get("unfreeze") if isinstance(space, dict) else None
        for depth in depths if isinstance(depths, (list, tuple)) else [values["unfreeze"]]:
            if depth != "all" and depth not in range(self.depths[-1] + 1):
                raise kt.errors.FatalValueError(
                    f"search_space: unfreeze={depth!r} is not a depth of this base (0 to "
                    f"{self.depths[-1]} blocks, or 'all').")
        return values

    def build(self, hp):
        values = self.values(hp)
        return self._model(values["head_units"], values["dropout"])

    def fit(self, hp, model, x, validation_data=None, *, epochs=1, initial_epoch=0, callbacks=(),
            verbose=1, **kwargs):
        start = time.perf_counter()
        values = self.values(hp)
        if self.seed is not None:
            keras.utils.set_random_seed(self.seed)
        if "tuner/trial_id" not in hp.values:  # else Hyperband loaded the earlier trial's weights
            self._load_head(model, values["head_units"], x, validation_data, verbose)
        models.unfreeze(model, values["unfreeze"], unit="blocks")
        if self._steps is None:
            self._steps = phases.steps_per_epoch(x)
        fit_model, x, validation_data = self._phase2_inputs(model, values["unfreeze"], x,
                                                            validation_data, verbose)
        schedule = phases.fine_tune_schedule(values["fine_tune_learning_rate"], self._steps,
                                              epochs)
        optimizer = phases.compile_for_task(fit_model, self.task, optimizer=values["optimizer"],
                                            learning_rate=schedule,
                                            label_smoothing=values["label_smoothing"])
        if initial_epoch:  # a Hyperband continuation: resume the schedule where it would be
            optimizer.build(fit_model.trainable_variables)
            optimizer.iterations.assign(initial_epoch * self._steps)
        callbacks = list(callbacks or [])
        trial_id = next((cb.trial.trial_id for cb in callbacks if hasattr(cb, "trial")), None)
        if fit_model is not model:  # Keras Tuner's checkpoint (and the rest) act on the model
            model.stop_training = False
            callbacks = [cb if isinstance(cb, keras.callbacks.TensorBoard)
                         else _OnFullModel(cb, model) for cb in callbacks]
        if trial_id is not None:
            log_dir = os.path.join(self.project_dir, "logs", f"trial_{trial_id}")
            hparams = {k: v for k, v in hp.values.items()
                       if k not in ("tuner/bracket", "tuner/round")}
            callbacks += [tb.EpochTensorBoard(log_dir, write_graph=False),
                          tb.HParamsCallback(hparams, log_dir, trial_id=f"trial_{trial_id}")]
        kwargs.setdefault("shuffle", False)  # tf.data shuffles itself (True: a Keras warning)
        history = fit_model.fit(x, validation_data=validation_data, epochs=epochs,
                                initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose,
                                **kwargs)
        # Constant columns: Keras Tuner keeps the best epoch's values as the trial's metrics.
        n = len(history.epoch)
        history.history["epochs"] = [float(n)] * n
        history.history["seconds"] = [time.perf_counter() - start] * n
        history.history["cached"] = [float(fit_model is not model)] * n
        return history

    def _phase2_inputs(self, model, depth, train, val, verbose):
        """`(fit_model, train, val)`: the unfrozen top on cached activations, or `model` as is.

        Depth 0 reuses phase 1's features (float32); depth k caches the
        activations below the top k blocks (float16, `tlkeras.cutpoint`).
        """
        if not self._caching(model):
            return model, train, val
        batch_size = phases.batch_size(train)
        if depth == 0:
            _, head = anatomy.split_model(model)
            train_features, val_features = self._cached_features(model, train, val, verbose)
            return head, features.features_dataset(
                train_features, batch_size=batch_size, seed=self.seed), features.features_dataset(
                val_features, batch_size=phases.batch_size(val), shuffle=False)
        cache = self._cut_dir()
        before = set(glob.glob(os.path.join(cache, "*.npz")))
        fit_model, train, val = cutpoint.phase_inputs(
            model, train, val, depth, "blocks", "auto", augmented=False, distributed=False,
            cache_dir=cache, verbose=verbose, seed=self.seed)
        self.activation_builds += len(set(glob.glob(os.path.join(cache, "*.npz"))) - before)
        return fit_model, train, val

    def _model(self, head_units, dropout):
        """The reference model with the trial's head, from the pretrained weights.

        The head is the reference's (`tlkeras.anatomy.head_config`: hidden layers, regularizer)
        but for the trial's dropout and `head_units`, the width of its first hidden layer (0: no
        hidden layer), freshly initialized. The layers below the head are one copy of the
        reference's, built once and shared by every model this returns (rebuilding Xception
        from its config took 8.1 s at load 12, restoring its weights 1.2 s); each call restores
        their pretrained weights, so a model returned earlier no longer holds what it trained.
        `_fresh_copies` (set by `tune` once the best model holds the shared layers) builds a
        copy of its own instead.
        """
        full = self._shared
        if full is None or self._fresh_copies:
            full = self._class.from_config(copy.deepcopy(self._config))  # from_config consumes it
            self._shared = self._shared if self._fresh_copies else full
        full.set_weights(self._weights)
        hidden = self._head["hidden_units"]
        hidden = (head_units, *hidden[1:]) if head_units else ()
        model = anatomy.rebuild_head(full, dropout=dropout, hidden_units=hidden)
        models.freeze(model)
        return model

    def _load_head(self, model, head_units, train, val, verbose):
        """Phase 1: load the trained head of this shape, training it first if needed."""
        dropout = self.values(kt.HyperParameters())["dropout"]  # the space's default
        head = {k: v for k, v in self._head.items() if k != "kernel_regularizer"}
        head["kernel_regularizer"] = keras.regularizers.serialize(self._head["kernel_regularizer"])
        digest = hashlib.sha1(json.dumps(head, sort_keys=True, default=str).encode()).hexdigest()
        name = (f"head_units-{head_units}_dropout-{dropout}_epochs-{self.head_epochs}"
                f"_lr-{self.head_learning_rate}_seed-{self.seed}_head-{digest[:8]}.npz")
        path = os.path.join(self.project_dir, "phase1", name)
        if not os.path.exists(path):
            phase1 = self._model(head_units, dropout)
            train_features, val_features = self._cached_features(phase1, train, val, verbose)
            _, head = anatomy.split_model(phase1)
            phases.compile_for_task(head, self.task, learning_rate=self.head_learning_rate)
            batch_size = phases.batch_size(train)
            head.fit(
                features.features_dataset(train_features, batch_size=batch_size, seed=self.seed),
                validation_data=features.features_dataset(val_features, batch_size=batch_size,
                                                          shuffle=False),
                epochs=self.head_epochs, verbose=verbose, shuffle=False)
            arrays = {f"{layer.name}/{i}": w for layer in _head_layers(phase1)
                      for i, w in enumerate(layer.get_weights())}
            with atomic.path(path) as tmp:
                np.savez(tmp, **arrays)
            self.heads_trained += 1
        with np.load(path) as saved:
            for layer in _head_layers(model):
                layer.set_weights([saved[f"{layer.name}/{i}"] for i in range(len(layer.weights))])

    def _cached_features(self, model, train, val, verbose):
        if self._features is None:
            cache = os.path.join(self.project_dir, "features")
            data = [(d, f"{key}-{int(d.cardinality())}") for key, d in
                    (("train", train), ("validation", val))]
            paths = [features.cache_path(model, d, cache, key) for d, key in data]
            missing = sum(not os.path.exists(path) for path in paths)
            if self._caching(model) and missing:  # one pass over each dataset, both redone
                self._features = self._features_and_cuts(model, train, val, paths, verbose)
                missing = len(paths)
            else:
                self._features = tuple(features.extract_features(
                    model, d, cache_dir=cache, key=key, verbose=verbose) for d, key in data)
            self.feature_extractions += missing
        return self._features

    def _features_and_cuts(self, model, train, val, paths, verbose):
        """One pass of the base per dataset: the features, and the cut activations of the
        search space's depths saved where each trial's phase 2 looks for them."""
        space = self.search_space if isinstance(self.search_space, dict) else {}
        depths = space.get("unfreeze", self.depths)
        depths = depths if isinstance(depths, (list, tuple)) else [depths]
        bottoms, results = cutpoint.features_and_cuts(model, [train, val], depths, "blocks",
                                                      verbose=verbose)
        sets = []
        for path, data, key, (pooled, cuts) in zip(paths, (train, val),
                                                   ("train", "validation"), results):
            for depth, cut in cuts.items():
                cut.cache_path = cutpoint.cache_path(bottoms[depth], data, self._cut_dir(), key)
                cutpoint.save(cut)
            sets.append(features.save(features.FeatureSet(pooled.features, pooled.labels, path)))
        self.cuts_with_features += len(bottoms)
        return tuple(sets)

    def _caching(self, model):
        """Whether phase 2 runs on cached features / activations (see `cache_activations`)."""
        return (self.cache_activations is not False and not anatomy.has_augmentation(model)
                and not tf.distribute.has_strategy())

    def _cut_dir(self):
        return os.path.join(self.project_dir, "activations")


def trials_table(trials, objective_name):
    """The rows of the trial table: a dict per trial, in trial-id order."""
    rows = []
    for trial in sorted(trials, key=lambda t: t.trial_id):
        values = trial.hyperparameters.values
        row = {"trial_id": trial.trial_id, "status": trial.status}
        row.update({k: v for k, v in values.items() if not k.startswith("tuner/")})
        if "tuner/trial_id" in values:
            row["continues"] = values["tuner/trial_id"]
        metrics = trial.metrics
        row[objective_name] = trial.score
        for name in ("epochs", "seconds", "cached"):
            row[name] = metrics.get_last_value(name) if metrics.exists(name) else None
        for name in ("epochs", "cached"):
            row[name] = int(row[name]) if row[name] is not None else None
        rows.append(row)
    return rows


def format_table(rows):
    """The trial table as fixed-width text."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.4g}" if math.isfinite(value) else str(value)
        return "" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _result(search, project_dir, worker, train, val, export_dir, export_formats, verbose):
    objective = search.oracle.objective
    trials = [kt.engine.trial.Trial.load(f)
              for f in glob.glob(os.path.join(project_dir, "trial_*", "trial.json"))]
    rows = trials_table(trials, objective.name)
    csv_path = os.path.join(project_dir, "trials.csv")
    if not worker:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            writer.writerows(rows)
    if verbose:
        print(format_table(rows))
    done = [t for t in trials if t.status == "COMPLETED" and t.score is not None]
    if not done:
        raise RuntimeError(f"No trial of the search in {project_dir} completed; see "
                           "trial_*/trial.json for their errors (verbose=1 shows them as they "
                           "happen).")
    best = (max if objective.direction == "max" else min)(done, key=lambda t: t.score)
    best_values = _Hyperparameters({k: v for k, v in best.hyperparameters.values.items()
                                    if not k.startswith("tuner/")})
    result = TuneResult(best_values, best.score, None, rows, csv_path, project_dir, search)
    if worker:
        return result
    with open(os.path.join(project_dir, "best_hyperparameters.json"), "w") as f:
        json.dump({"trial_id": best.trial_id, objective.name: best.score, **best_values}, f,
                  indent=2, default=str)
    # The search is over: the best model takes the shared layers, later builds copy them.
    result.best_model = search.load_model(best)
    search.hypermodel._fresh_copies = True
    if export_dir is not None:
        result.export = export_model(result.best_model, export_dir, formats=export_formats,
                                     class_names=getattr(train, "class_names", None),
                                     representative_data=val)
    return result


def _reference_model(base_or_model, train, num_classes, task, input_shape, weights, augmentation):
    if anatomy.is_transfer_model(base_or_model):
        return base_or_model
    if input_shape is None:
        spec = train.element_spec
        shape = (spec[0] if isinstance(spec, tuple) else spec).shape
        if shape.rank != 4 or None in shape[1:]:
            raise ValueError(f"tune: cannot tell the image size from train_data (batches of shape "
                             f"{shape}); pass input_shape=(height, width, 3).")
        input_shape = tuple(shape[1:])
    return models.build_transfer_model(base_or_model, num_classes, task=task,
                                       input_shape=input_shape, weights=weights,
                                       augmentation=augmentation)


def _new_keys(space):
    """`space` with its keys in today's vocabulary (old keys warn; see `tlkeras.deprecation`)."""
    out = {}
    for key, value in space.items():
        new = deprecation.RENAMED_HYPERPARAMETERS.get(key)
        if new is not None:
            key = deprecation.renamed("tune: search_space", repr(key), new, repr(new),
                                      stacklevel=5)
        out[key] = value
    return out


class _Hyperparameters(dict):
    """`best_hyperparameters`: a dict that still answers to the old key names (with a warning)."""

    def __missing__(self, key):
        new = deprecation.RENAMED_HYPERPARAMETERS.get(key)
        if new is None or new not in self:
            raise KeyError(key)
        return self[deprecation.renamed("TuneResult.best_hyperparameters", repr(key), new,
                                        repr(new))]


class _OnFullModel(keras.callbacks.Callback):
    """Runs `callback` against the trial's whole model while `fit` trains its top alone.

    The top shares the model's layers, so a checkpoint of the model taken
    after the top's epoch holds what the epoch trained. A stop requested
    on the model (`EarlyStopping`) is passed on to the top's `fit`.
    """

    def __init__(self, callback, model):
        super().__init__()
        self.callback, self.full_model, self.fit_model = callback, model, None
        callback.set_model(model)

    def set_model(self, model):
        self.fit_model = model

    def set_params(self, params):
        self.callback.set_params(params)


def _forward(hook):
    def method(self, *args, **kwargs):
        getattr(self.callback, hook)(*args, **kwargs)
        if self.full_model.stop_training and self.fit_model is not None:
            self.fit_model.stop_training = True
    method.__name__ = hook
    return method


for _hook in ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_train_batch_begin", "on_train_batch_end", "on_test_begin", "on_test_end",
              "on_test_batch_begin", "on_test_batch_end"):
    setattr(_OnFullModel, _hook, _forward(_hook))


def _trains(layers):
    return any(layer.weights for layer in layers
               if not isinstance(layer, keras.layers.BatchNormalization))


_head_layers = anatomy.get_head


def _is_distributed_worker():
    from keras_tuner.src.distribute import utils

    return utils.has_chief_oracle() and not utils.is_chief_oracle()
