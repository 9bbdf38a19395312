"""tlkeras.tune: Keras Tuner search over unfreeze depth with phase 1 run once per search.

A tiny CNN base is pretrained with plain Keras on digits 0-4, then transferred to digits 5-9.
"""

import csv
import glob
import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

import tlkeras
from conftest import REPO, digits_rgb

# 10 head epochs (cheap: on cached features): with 3, the head's val_accuracy after phase 1
# ranged 0.11-0.42 over seeds and initial draws, and a threshold below tested luck.
SMALL = dict(num_classes=5, head_epochs=10, head_learning_rate=3e-3, seed=0, verbose=0)


def tiny_base():
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
        keras.layers.BatchNormalization(momentum=0.9, name="bn1"),
        keras.layers.MaxPool2D(name="pool1"),
        keras.layers.Conv2D(16, 3, activation="relu", name="conv2"),
        keras.layers.BatchNormalization(momentum=0.9, name="bn2"),
        keras.layers.MaxPool2D(name="pool2"),
        keras.layers.Conv2D(16, 3, activation="relu", name="conv3"),
    ], name="tiny_base")


def digit_datasets(n_train=300, n_val=150):
    x, y = digits_rgb(32, classes=[5, 6, 7, 8, 9])
    x = x.astype("float32")
    train = tf.data.Dataset.from_tensor_slices((x[:n_train], y[:n_train])).batch(32)
    val = tf.data.Dataset.from_tensor_slices((x[n_train:n_train + n_val],
                                              y[n_train:n_train + n_val])).batch(32)
    return train, val


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(base pretrained on digits 0-4, its .keras path, train and validation data of 5-9)."""
    keras.utils.set_random_seed(0)
    x, y = digits_rgb(32, classes=[0, 1, 2, 3, 4])
    base = tiny_base()
    model = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(5, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    assert model.evaluate(x, y, verbose=0)[1] > 0.6
    path = tmp_path_factory.mktemp("base") / "base.keras"
    base.save(path)
    return base, path, *digit_datasets()


def read_run(path):
    accumulator = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return accumulator


def test_hyperband_budget_maps_onto_fine_tune_epochs_and_best_model_exports(pretrained, tmp_path):
    base, _, train, val = pretrained
    result = tlkeras.tune(base, train, val, tuner="hyperband", max_epochs=3, factor=3, max_trials=4,
                          run_dir=tmp_path / "hb", export_dir=tmp_path / "export",
                          **SMALL)
    rows = result.trials
    assert [r["trial_id"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    # Bracket 1 of Hyperband(max_epochs=3, factor=3): three 1-epoch trials, then the best of
    # them continues from its checkpoint for epochs 1..3, i.e. 2 more fine-tune epochs.
    assert [r["epochs"] for r in rows] == [1, 1, 1, 2]
    best_first = max(r["val_accuracy"] for r in rows[:3])
    [first] = [r for r in rows[:3] if r["trial_id"] == rows[3]["continues"]]
    assert first["val_accuracy"] == best_first
    assert first["unfreeze"] == rows[3]["unfreeze"]
    assert result.best_score == max(r["val_accuracy"] for r in rows) > 0.3
    with open(result.csv_path) as f:
        table = list(csv.DictReader(f))
    assert [t["trial_id"] for t in table] == ["0", "1", "2", "3"]
    assert {"unfreeze", "fine_tune_learning_rate", "dropout", "val_accuracy", "epochs",
            "seconds"} <= set(table[0])
    assert float(table[3]["seconds"]) > 0
    # The best model is the best trial's, restored; its export reloads and predicts the same.
    x = next(iter(val))[0][:8]
    result.best_model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    accuracy = result.best_model.evaluate(val, verbose=0)[1]
    # The trials ran on cached activations (float16): at most one image of 150 may flip.
    assert accuracy == pytest.approx(result.best_score, abs=1.01 / 150)
    exported = keras.saving.load_model(result.export.paths["keras"])
    np.testing.assert_allclose(exported.predict(x, verbose=0),
                               result.best_model.predict(x, verbose=0), atol=1e-5)
    with open(os.path.join(result.directory, "best_hyperparameters.json")) as f:
        assert json.load(f)["unfreeze"] == result.best_hyperparameters["unfreeze"]
    with pytest.warns(FutureWarning, match="use `'unfreeze'`"):  # the old name, for one release
        assert result.best_hyperparameters["unfreeze_depth"] == result.best_hyperparameters[
            "unfreeze"]


class BaseAtStart(keras.callbacks.Callback):
    """Records, as each trial's phase 2 begins, whether the base holds `expected`'s weights."""

    starts = []  # class-level: Keras Tuner gives each trial a deep copy of the callback

    def __init__(self, expected):
        super().__init__()
        self.expected = expected

    def on_train_begin(self, logs=None):
        base = tlkeras.get_base(self.model)
        type(self).starts.append(all(
            np.array_equal(a, b) for name, weights in self.expected.items()
            for a, b in zip(weights, base.get_layer(name).get_weights())))


def test_depths_train_exactly_their_blocks_and_trials_log_hparams(pretrained, tmp_path):
    base, _, train, val = pretrained
    names = ["conv1", "bn1", "conv2", "bn2", "conv3"]
    before = {name: base.get_layer(name).get_weights() for name in names}
    BaseAtStart.starts = []
    result = tlkeras.tune(base, train, val, tuner="grid", max_trials=3, max_epochs=1,
                          search_space={"unfreeze": [0, 1, 3], "fine_tune_learning_rate": 1e-3,
                                        "dropout": 0.0},
                          run_dir=tmp_path / "grid", callbacks=[BaseAtStart(before)], **SMALL)
    # The trials share one built base: each starts from the pretrained weights, the depth-3
    # trial too, after the depth-1 trial fine-tuned conv3 in place.
    assert [r["unfreeze"] for r in result.trials] == [0, 1, 3]
    assert BaseAtStart.starts == [True, True, True]
    x = next(iter(val))[0][:8]
    best_before = result.best_model.predict(x, verbose=0)
    oracle = result.tuner.oracle
    depths = {}
    for trial_id, trial in oracle.trials.items():
        depth = trial.hyperparameters.get("unfreeze")
        model = result.tuner.load_model(trial)
        trained = tlkeras.get_base(model)
        changed = {name for name, weights in before.items()
                   if any(not np.array_equal(a, b)
                          for a, b in zip(weights, trained.get_layer(name).get_weights()))}
        depths[depth] = changed
        # TensorBoard: the trial's HParams session and its metrics, read from the event files.
        run = read_run(os.path.join(result.directory, "logs", f"trial_{trial_id}"))
        content = run.PluginTagToContent("hparams")[hparams_metadata.SESSION_START_INFO_TAG]
        info = hparams_metadata.parse_session_start_info_plugin_data(content)
        assert info.group_name == f"trial_{trial_id}"
        assert dict(info.hparams)["unfreeze"].number_value == depth
        [event] = run.Tensors("hparams/val_accuracy")
        assert float(tf.make_ndarray(event.tensor_proto)) == pytest.approx(trial.score)
    # Depth d trains the top d blocks of the base; BatchNormalization never changes.
    assert depths == {0: set(), 1: {"conv3"}, 3: {"conv1", "conv2", "conv3"}}
    # The best model holds the search's shared layers; loading trials after it copies them.
    np.testing.assert_array_equal(result.best_model.predict(x, verbose=0), best_before)
    # The user's base object itself is untouched.
    for name, weights in before.items():
        for a, b in zip(weights, base.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_trials_run_on_cached_activations_with_the_objective_of_recomputing(pretrained, tmp_path):
    base, _, train, val = pretrained
    x, y = next(iter(train.unbatch().batch(96)))
    one_batch = tf.data.Dataset.from_tensor_slices((x, y)).batch(96)  # order-free: one batch
    args = dict(tuner="grid", max_trials=2, max_epochs=2, objective="val_loss",
                search_space={"unfreeze": [0, 2], "fine_tune_learning_rate": 1e-3,
                              "dropout": 0.0}, **SMALL)
    cached = tlkeras.tune(base, one_batch, val, run_dir=tmp_path / "cached", **args)
    recomputed = tlkeras.tune(base, one_batch, val, run_dir=tmp_path / "plain",
                              cache_activations=False, **args)
    assert [r["cached"] for r in cached.trials] == [1, 1]
    assert [r["cached"] for r in recomputed.trials] == [0, 0]
    # Depth 0 reuses phase 1's features; depth 2's activations came with them, from the same
    # pass of the base (train, validation), with no pass of its own.
    assert cached.tuner.hypermodel.cuts_with_features == 1
    assert cached.tuner.hypermodel.activation_builds == 0
    assert len(os.listdir(tmp_path / "cached" / "activations")) == 2
    assert recomputed.tuner.hypermodel.activation_builds == 0
    assert [r["unfreeze"] for r in cached.trials] == [r["unfreeze"] for r in recomputed.trials]
    # float16 activations: the objective (val_loss) matches recomputing to 1% relative.
    np.testing.assert_allclose([r["val_loss"] for r in cached.trials],
                               [r["val_loss"] for r in recomputed.trials], rtol=1e-2)
    # The checkpoint is the whole model's: the top trained in place.
    best = cached.best_model
    best.compile(loss="sparse_categorical_crossentropy")
    assert best.evaluate(val, verbose=0) == pytest.approx(cached.best_score, rel=1e-2)


def test_phase1_once_per_search_and_once_per_head_width(pretrained, tmp_path):
    base, _, train, val = pretrained
    with pytest.warns(FutureWarning) as caught:  # old names still work, for one release
        result = tlkeras.tune(base, train, val, tuner="bayesian", max_trials=3, max_epochs=1,
                              num_initial_points=2,
                              search_space={"head_units": [0, 8], "unfreeze_depth": [0, 1]},
                              directory=tmp_path, project_name="bayes", **SMALL)
    messages = " ".join(str(w.message) for w in caught)
    assert "use `run_dir`" in messages and "use `'unfreeze'`" in messages
    assert result.directory == str(tmp_path / "bayes")
    rows = result.trials
    assert len(rows) == 3 and all(r["status"] == "COMPLETED" for r in rows)
    hypermodel = result.tuner.hypermodel
    # The base ran over the data once per search (train + validation), whatever the trials.
    assert hypermodel.feature_extractions == 2
    assert len(glob.glob(os.path.join(result.directory, "features", "*.npz"))) == 2
    # One phase-1 head per distinct head width.
    widths = {r["head_units"] for r in rows}
    assert hypermodel.heads_trained == len(widths)
    assert len(glob.glob(os.path.join(result.directory, "phase1", "*.npz"))) == len(widths)
    model = result.best_model
    if result.best_hyperparameters["head_units"]:
        assert model.get_layer("head_dense_0").units == 8
    else:
        assert "head_dense_0" not in [layer.name for layer in model.layers]


class Killed(BaseException):
    """Stands for the process being killed mid-trial (Keras Tuner only catches Exception)."""


class FitCounter(keras.callbacks.Callback):
    fits = 0
    kill_at = None

    def on_train_begin(self, logs=None):
        type(self).fits += 1
        if type(self).fits == type(self).kill_at:
            raise Killed


def test_interrupted_search_resumes_without_repeating_finished_work(pretrained, tmp_path):
    base, _, train, val = pretrained
    args = dict(tuner="random", max_trials=3, max_epochs=1, run_dir=tmp_path / "rs",
                callbacks=[FitCounter()], **SMALL)
    FitCounter.fits, FitCounter.kill_at = 0, 2
    with pytest.raises(Killed):
        tlkeras.tune(base, train, val, **args)  # killed in its second trial
    project = tmp_path / "rs"
    done = json.loads((project / "trial_0" / "trial.json").read_text())
    assert done["status"] == "COMPLETED"
    files = [project / "trial_0" / "checkpoint.weights.h5",
             *glob.glob(str(project / "features" / "*")), *glob.glob(str(project / "phase1" / "*"))]
    state = {p: os.path.getmtime(p) for p in files}
    assert len(state) == 4

    FitCounter.fits, FitCounter.kill_at = 0, None
    result = tlkeras.tune(base, train, val, **args)
    assert FitCounter.fits == 2  # the interrupted trial again, and the third one
    assert [r["trial_id"] for r in result.trials] == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in result.trials)
    assert result.trials[0]["val_accuracy"] == done["score"]
    assert {p: os.path.getmtime(p) for p in files} == state
    assert result.tuner.hypermodel.feature_extractions == 0
    assert result.tuner.hypermodel.heads_trained == 0


def test_bad_arguments_name_the_argument(pretrained, tmp_path):
    base, _, train, val = pretrained
    with pytest.raises(ValueError, match="tuner"):
        tlkeras.tune(base, train, val, num_classes=5, tuner="annealing", run_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown keys \\['depth'\\]"):
        tlkeras.tune(base, train, val, num_classes=5, search_space={"depth": [1, 2]},
                     run_dir=tmp_path)
    with pytest.raises(ValueError, match="unfreeze=7"):
        tlkeras.tune(base, train, val, num_classes=5, search_space={"unfreeze": [1, 7]},
                     tuner="grid", run_dir=tmp_path, verbose=0)
    augmented = train.map(lambda x, y: (x, y))
    augmented.augmentation = "standard"
    with pytest.raises(ValueError, match="augment in the model"):
        tlkeras.tune(base, augmented, val, num_classes=5, run_dir=tmp_path)
    with pytest.raises(TypeError, match="train_data"):
        tlkeras.tune(base, (np.zeros((4, 32, 32, 3)), np.zeros(4)), val, num_classes=5)


SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import keras, tlkeras
from test_tuning import digit_datasets
train, val = digit_datasets()
result = tlkeras.tune(keras.saving.load_model({base!r}), train, val, num_classes=5, tuner="random",
                      max_trials=2, max_epochs=1, run_dir={directory!r} + "/dist",
                      head_epochs=2, seed=0, verbose=0)
with open(sys.argv[1], "w") as f:
    json.dump({{"trials": result.trials, "best_model": result.best_model is not None}}, f)
"""


@pytest.mark.slow
def test_chief_and_worker_complete_a_search_together(pretrained, tmp_path):
    _, base_path, _, _ = pretrained
    script = tmp_path / "search.py"
    script.write_text(SCRIPT.format(tests=os.path.join(REPO, "tests"), base=str(base_path),
                                    directory=str(tmp_path / "search")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = {}
    for tuner_id in ("chief", "tuner0"):
        env = {**os.environ, "KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": "127.0.0.1",
               "KERASTUNER_ORACLE_PORT": str(port), "PYTHONPATH": REPO}
        processes[tuner_id] = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"{tuner_id}.json")], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {}
    try:
        for tuner_id, process in processes.items():
            outputs[tuner_id] = process.communicate(timeout=300)[0]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    for tuner_id, process in processes.items():
        assert process.returncode == 0, f"{tuner_id}:\n{outputs.get(tuner_id, '')[-3000:]}"
    chief = json.loads((tmp_path / "chief.json").read_text())
    worker = json.loads((tmp_path / "tuner0.json").read_text())
    assert [t["status"] for t in chief["trials"]] == ["COMPLETED", "COMPLETED"]
    assert chief["best_model"] and not worker["best_model"]
    assert worker["trials"] == chief["trials"]
    project = tmp_path / "search" / "dist"
    # The worker ran the trials (phase 1 included); the chief only served the oracle.
    assert len(glob.glob(str(project / "phase1" / "*.npz"))) == 1
    assert sorted(os.listdir(project / "logs")) == ["trial_0", "trial_1"]
