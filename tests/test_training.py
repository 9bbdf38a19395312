"""fine_tune on small real data: both phases, frozen BatchNorm, precision, resume, multi-worker."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest

import tlkeras
from conftest import REPO, XCEPTION_WEIGHTS, digits_rgb

SIZE = 32


def tiny_base():
    return keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Rescaling(1 / 255.0, name="rescale"),
        keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
        keras.layers.BatchNormalization(name="bn1"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2"),
        keras.layers.BatchNormalization(name="bn2"),
        keras.layers.Conv2D(32, 3, activation="relu", name="conv3"),
        keras.layers.BatchNormalization(name="bn3"),
    ], name="tiny_cnn")


@pytest.fixture(scope="module")
def pretrained_base():
    """A small CNN trained with plain Keras on digits 0-4 (the source task)."""
    keras.utils.set_random_seed(0)
    x, y = digits_rgb(SIZE, classes=[0, 1, 2, 3, 4])
    base = tiny_base()
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9  # moving statistics settle within the few steps of this fixture
    source = keras.Sequential([base, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5, activation="softmax")])
    source.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    source.fit(x, y, epochs=4, batch_size=32, verbose=0)
    path = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"tlkeras_tiny_base_{os.getpid()}.keras")
    base.save(path)
    return path


@pytest.fixture(scope="module")
def target_data():
    x, y = digits_rgb(SIZE, classes=[5, 6, 7, 8, 9])
    train = tlkeras.data.from_arrays(x[:300], y[:300], batch_size=32, seed=0)
    val = tlkeras.data.from_arrays(x[300:], y[300:], batch_size=64, shuffle=False)
    return train, val


def _transfer_model(base_path, **kwargs):
    return tlkeras.build_transfer_model(keras.saving.load_model(base_path), 5, **kwargs)


def test_two_phases_train_the_head_then_only_the_unfrozen_layers(pretrained_base, target_data, tmp_path):
    train, val = target_data
    model = _transfer_model(pretrained_base)
    base = tlkeras.get_base(model)
    before = {l.name: [w.numpy().copy() for w in l.weights] for l in base.layers}
    head_before = model.get_layer("predictions").kernel.numpy().copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tlkeras.fine_tune(model, train, val, head_epochs=4, fine_tune_epochs=2, unfreeze=1,
                                   unfreeze_unit="blocks", head_learning_rate=1e-2,
                                   run_dir=tmp_path / "run", seed=0, verbose=0)
    # No Keras note that fit's default shuffle=True is ignored for tf.data (a notebook shows it).
    assert not [w for w in caught if "shuffle=True" in str(w.message)]
    assert result.used_feature_cache and result.model is model
    assert len(result.history["val_accuracy"]) == 6 == result.epochs
    lr = result.history["learning_rate"]
    assert lr[3] == pytest.approx(1e-2) and lr[4] < lr[3] / 5  # phase 2 learning rate is lower
    assert result.history["val_accuracy"][-1] > 0.7  # chance is 0.2
    # Phase 2 changed only the top block (conv3 and its frozen BatchNorm); BN statistics never moved.
    after = {l.name: [w.numpy() for w in l.weights] for l in base.layers}
    for name in ["conv1", "bn1", "conv2", "bn2", "bn3"]:
        for a, b in zip(before[name], after[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert not np.allclose(before["conv3"][0], after["conv3"][0])
    assert not np.allclose(head_before, model.get_layer("predictions").kernel.numpy())
    run = tmp_path / "run"
    for name in ["config.json", "history.csv", "model.keras", "checkpoints/best.weights.h5", "logs"]:
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["head_epochs"] == 4 and config["unfreeze"] == 1 and config["base"] == "tiny_cnn"
    lines = (run / "history.csv").read_text().strip().splitlines()
    assert len(lines) == 7 and lines[0].startswith("epoch,")
    reloaded = keras.saving.load_model(run / "model.keras")
    x = next(iter(val))[0][:8]
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_feature_cache_is_skipped_for_augmented_data_and_either_phase_can_be_empty(pretrained_base, target_data):
    train, val = target_data
    model = _transfer_model(pretrained_base, augmentation=[keras.layers.RandomFlip("horizontal")])
    result = tlkeras.fine_tune(model, train, val, head_epochs=1, fine_tune_epochs=0, verbose=0)
    assert not result.used_feature_cache and result.epochs == 1
    with pytest.raises(ValueError, match="augmented"):
        tlkeras.fine_tune(model, train, head_epochs=1, fine_tune_epochs=0, cache_features=True, verbose=0)
    x, y = digits_rgb(SIZE, classes=[5, 6, 7, 8, 9])
    augmented = tlkeras.data.from_arrays(x[:64], y[:64], batch_size=32, seed=0, augmentation="light")
    plain = _transfer_model(pretrained_base)
    result = tlkeras.fine_tune(plain, augmented, head_epochs=1, fine_tune_epochs=0, verbose=0)
    assert not result.used_feature_cache  # the pipeline's augmentation is seen, not frozen into a cache
    mapped = augmented.map(lambda x, y: (x, y))  # drops the attributes riding on the dataset
    assert getattr(mapped, "augmentation", None) is None
    result = tlkeras.fine_tune(plain, mapped, head_epochs=1, fine_tune_epochs=0, verbose=0)
    assert not result.used_feature_cache  # still seen: its random ops are in the pipeline
    with pytest.raises(ValueError, match="augmented"):
        tlkeras.fine_tune(plain, mapped, head_epochs=1, fine_tune_epochs=0, cache_features=True,
                          verbose=0)
    result = tlkeras.fine_tune(model, train, head_epochs=0, fine_tune_epochs=1, verbose=0)
    assert len(result.history["loss"]) == 1
    with pytest.raises(ValueError, match="precision"):
        tlkeras.fine_tune(model, train, precision="float8", verbose=0)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_on_cpu_keeps_float32_output_and_restores_policy(pretrained_base, target_data, precision):
    train, val = target_data
    model = _transfer_model(pretrained_base)
    kernel = model.get_layer("predictions").kernel.numpy().copy()
    result = tlkeras.fine_tune(model, train, val, head_epochs=1, fine_tune_epochs=1, precision=precision,
                               verbose=0)
    assert result.precision == precision
    assert keras.mixed_precision.global_policy().name == "float32"
    assert not np.allclose(kernel, model.get_layer("predictions").kernel.numpy())
    out = model(next(iter(val))[0])
    assert out.dtype == "float32" and np.isfinite(out.numpy()).all()
    assert np.isfinite(result.history["loss"]).all()


SCRIPT = """
import sys, time, json
sys.path.insert(0, {tests!r})
import keras, numpy as np, tensorflow as tf, tlkeras
{prelude}
from conftest import digits_rgb
from test_training import tiny_base

class Progress(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        with open({progress!r}, "a") as f:
            f.write(f"{{epoch}}\\n")
        time.sleep({sleep})

x, y = digits_rgb(32, classes=[5, 6, 7])
x, y = x[:{n}], y[:{n}]
train = tlkeras.data.from_arrays(x, y, batch_size=16, seed=0)
keras.utils.set_random_seed(0)
model = tlkeras.build_transfer_model(tiny_base(), 3)
result = tlkeras.fine_tune(model, train, head_epochs=3, fine_tune_epochs=3, unfreeze="all",
                           log_dir={log_dir!r}, callbacks=[Progress()], verbose=0, **{extra})
np.savez({out!r}, *[w for w in model.get_weights()])
print("DONE", len(result.history["loss"]))
"""


def _script(tmp_path, n=96, sleep=0.0, extra=None, prelude=""):
    progress, out = tmp_path / "progress.txt", tmp_path / "weights.npz"
    path = tmp_path / "train.py"
    path.write_text(SCRIPT.format(tests=os.path.join(REPO, "tests"), progress=str(progress), sleep=sleep, n=n,
                                  log_dir=str(tmp_path / "run"), out=str(out), extra=extra or "{}",
                                  prelude=prelude))
    return path, progress, out


def _epochs_done(progress):
    return [int(line) for line in progress.read_text().split()] if progress.exists() else []


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(tmp_path):
    """Killed in phase 1 (after epoch 0), resumed and killed again in phase 2 (after epoch 4),
    resumed again: each run starts after the last epoch backed up, and the run ends."""
    script, progress, _ = _script(tmp_path, sleep=1.0)
    runs = []
    for kill_after_epoch in (0, 4):  # in phase 1, in phase 2
        proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while kill_after_epoch not in _epochs_done(progress):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        runs.append(_epochs_done(progress))
        assert 5 not in runs[-1]  # it really was killed mid-run
        progress.unlink()
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "DONE 6" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    runs.append(_epochs_done(progress))
    # Resumed after the last epoch backed up: no epoch already done ran again, none is missing.
    for before, after in zip(runs, runs[1:]):
        assert after[0] == max(before) + 1, runs
    assert sorted(set().union(*runs)) == list(range(6)), runs
    rows = (tmp_path / "run" / "history.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(6))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_two_workers_agree(tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, outs = [], []
    for index in range(2):
        d = tmp_path / f"w{index}"
        d.mkdir()
        # As in any multi-worker program, the strategy is created before any other TF op runs.
        script, _, out = _script(d, n=64, extra="dict(strategy=strategy)",
                                 prelude="strategy = tf.distribute.MultiWorkerMirroredStrategy()")
        script.write_text(script.read_text().replace(str(d / "run"), str(tmp_path / "run")))
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "CUDA_VISIBLE_DEVICES": ""}
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs.append(out)
    logs = [p.communicate(timeout=400)[0] for p in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0 and "DONE 6" in log, log[-12000:]
    first, second = np.load(outs[0]), np.load(outs[1])
    assert len(first.files) == len(second.files) > 0
    for key in first.files:
        np.testing.assert_allclose(first[key], second[key], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "run" / "model.keras").exists()  # written by the chief (worker 0) only
    assert not (tmp_path / "run" / "worker_worker1" / "model.keras").exists()


@pytest.mark.skipif(not os.path.exists(XCEPTION_WEIGHTS), reason=f"real weights absent: {XCEPTION_WEIGHTS}")
def test_real_xception_weights_beat_random_init_by_a_wide_margin():
    x, y = digits_rgb(71, classes=[1, 4, 7, 9])
    train = tlkeras.data.from_arrays(x[:160], y[:160], batch_size=32, seed=0)
    val = tlkeras.data.from_arrays(x[160:400], y[160:400], batch_size=80, shuffle=False)
    accuracy = {}
    for weights in (XCEPTION_WEIGHTS, None):
        model = tlkeras.build_transfer_model("Xception", 4, input_shape=(71, 71, 3), weights=weights)
        # Phase 2 at 1.5e-4 (head / 20): the default head / 5 (6e-4 here) is measured at the
        # default head rate; one epoch of it at this higher head rate lowers the margin.
        result = tlkeras.fine_tune(model, train, val, head_epochs=6, fine_tune_epochs=1, unfreeze=1,
                                   learning_rate=3e-3, fine_tune_learning_rate=1.5e-4, seed=0,
                                   verbose=0)
        accuracy[weights] = result.history["val_accuracy"][-1]
    assert accuracy[XCEPTION_WEIGHTS] > 0.85, accuracy
    assert accuracy[XCEPTION_WEIGHTS] - accuracy[None] > 0.3, accuracy
