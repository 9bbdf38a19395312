"""TensorBoard callbacks: event files read back with TensorBoard's own reader and server."""

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

import tlkeras
from tlkeras.callbacks import write_hparams, tensorboard_callbacks

CLASSES = ["red", "green", "blue"]
HPARAMS = {"base": "tiny", "learning_rate": 0.01, "hidden_units": (4,), "augment": False}


def color_dataset(n=48, seed=0):
    """Class c = images whose channel c is brightest."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.uniform(0, 120, (n, 16, 16, 3)).astype("float32")
    x[np.arange(n), :, :, y] += 120
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    ds.class_names = CLASSES
    return ds


def tiny_model():
    base = keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(4, 3)]
    )
    return tlkeras.build_transfer_model(base, num_classes=3, weights=None, dropout=0.0)


def read_run(path):
    accumulator = event_accumulator.EventAccumulator(
        str(path), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return accumulator


def scalars(run, tag):
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in run.Tensors(tag)}


@pytest.fixture(scope="module")
def two_phase_run(tmp_path_factory):
    """A two-phase fit (head at lr 1e-2, then lr 1e-3) logged into runs/a/logs."""
    log_dir = tmp_path_factory.mktemp("runs") / "a" / "logs"
    data = color_dataset()
    model = tiny_model()
    histories = []
    for lr, epochs, initial_epoch in ((1e-2, 2, 0), (1e-3, 4, 2)):
        model.compile(
            keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        callbacks = tensorboard_callbacks(
            log_dir,
            validation_data=data,
            hparams=HPARAMS,
            profile_batch=(2, 2) if initial_epoch == 0 else 0,
            every_n_epochs=2,
            num_images=6,
        )
        history = model.fit(
            data,
            validation_data=data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            verbose=0,
        )
        histories.append(history.history)
    history = {k: histories[0][k] + histories[1][k] for k in histories[0]}
    return log_dir, history


def test_scalars_of_both_phases_share_one_epoch_axis(two_phase_run):
    log_dir, history = two_phase_run
    train, validation = read_run(log_dir / "train"), read_run(log_dir / "validation")

    assert scalars(train, "epoch_learning_rate") == pytest.approx(
        {0: 1e-2, 1: 1e-2, 2: 1e-3, 3: 1e-3}
    )
    assert scalars(train, "epoch_loss") == pytest.approx(dict(enumerate(history["loss"])), rel=1e-5)
    assert scalars(validation, "epoch_accuracy") == pytest.approx(
        dict(enumerate(history["val_accuracy"]))
    )
    # No scalars stepped by the optimizer's iterations, which restart in phase 2.
    assert not [t for t in validation.Tags()["tensors"] if "vs_iterations" in t]


def test_images_are_logged_every_n_epochs(two_phase_run):
    log_dir, _ = two_phase_run
    images = read_run(log_dir / "images")
    tags = {"confusion_matrix", "sample_predictions", "grad_cam"}
    assert set(images.PluginTagToContent("images")) == tags
    assert [e.step for e in images.Tensors("confusion_matrix")] == [1, 3]
    assert [e.step for e in images.Tensors("grad_cam")] == [1, 3]
    assert [e.step for e in images.Tensors("sample_predictions")] == [0, 1, 2, 3]
    for tag in tags:
        width, height, png = images.Tensors(tag)[-1].tensor_proto.string_val
        image = Image.open(io.BytesIO(png))
        assert image.size == (int(width), int(height))
        assert image.size[0] > 300 and image.size[1] > 200
        assert len(image.getcolors(maxcolors=1 << 20)) > 50  # a drawing, not a blank


def test_hparams_session_and_metrics(two_phase_run):
    log_dir, history = two_phase_run
    # The session lives with the train scalars: no extra run in `log_dir` itself.
    assert not [f for f in os.listdir(log_dir) if f.startswith("events.out")]
    run = read_run(log_dir / "train")
    content = run.PluginTagToContent("hparams")[hparams_metadata.SESSION_START_INFO_TAG]
    info = hparams_metadata.parse_session_start_info_plugin_data(content)
    assert dict(info.hparams)["base"].string_value == "tiny"
    assert dict(info.hparams)["learning_rate"].number_value == 0.01
    assert dict(info.hparams)["hidden_units"].string_value == "(4,)"
    assert dict(info.hparams)["augment"].bool_value is False
    assert info.group_name == "a"  # the trial id: the run folder's name, not a machine path
    assert scalars(run, "hparams/val_accuracy") == pytest.approx(
        dict(enumerate(history["val_accuracy"]))
    )


def test_profile_batch_writes_a_trace(two_phase_run):
    log_dir, _ = two_phase_run
    traces = [
        f for _, _, files in os.walk(log_dir / "train" / "plugins" / "profile") for f in files
    ]
    assert any(f.endswith(".xplane.pb") for f in traces)


def test_callbacks_without_validation_data_or_hparams():
    callbacks = tensorboard_callbacks("unused", histogram_freq=1)
    assert [type(c).__name__ for c in callbacks] == ["EpochTensorBoard"]
    assert callbacks[0].histogram_freq == 1


@pytest.mark.parametrize("task", ["binary", "multilabel", "regression"])
def test_other_tasks(tmp_path, task):
    x = np.random.default_rng(0).uniform(0, 255, (24, 16, 16, 3)).astype("float32")
    y = {
        "binary": np.arange(24) % 2,
        "multilabel": np.eye(3)[np.arange(24) % 3],
        "regression": x.mean((1, 2)),
    }[task]
    base = keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(4, 3)]
    )
    model = tlkeras.build_transfer_model(
        base, num_classes=None if task == "binary" else 3, task=task, weights=None
    )
    model.compile("adam", "mse")
    callbacks = tensorboard_callbacks(tmp_path, validation_data=(x, y), num_images=4)
    if task == "binary":
        model.fit(x, y, epochs=2, callbacks=callbacks, verbose=0)
        expected = {"confusion_matrix", "sample_predictions", "grad_cam"}
    else:
        with pytest.warns(
            UserWarning, match=f"ConfusionMatrixCallback does nothing for task='{task}'"
        ):
            model.fit(x, y, epochs=2, callbacks=callbacks, verbose=0)
        expected = {"sample_predictions"}
    images = read_run(tmp_path / "images")
    assert set(images.PluginTagToContent("images")) == expected
    assert [e.step for e in images.Tensors("sample_predictions")] == [0, 1]


def test_class_names_must_match_the_model(tmp_path):
    model = tiny_model()
    model.compile("adam", "sparse_categorical_crossentropy")
    callbacks = tensorboard_callbacks(
        tmp_path, validation_data=color_dataset(16), class_names=["a", "b"]
    )
    with pytest.raises(ValueError, match="class_names has 2 names but the multiclass model has 3"):
        model.fit(color_dataset(16), epochs=1, callbacks=callbacks, verbose=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_server_shows_runs_scalars_and_hparams(two_phase_run):
    log_dir, _ = two_phase_run
    parent = log_dir.parent.parent  # runs/, holding run "a" and a second run "b"
    write_hparams(parent / "b" / "logs", {**HPARAMS, "base": "other"}, {"val_accuracy": 0.25})
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(parent),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, runs = time.monotonic() + 120, []
        while "a/logs/validation" not in runs or "b/logs" not in runs:
            assert time.monotonic() < deadline, f"TensorBoard did not list the runs in time: {runs}"
            assert server.poll() is None, "TensorBoard exited"
            try:
                runs = _get(url + "/data/runs")
            except OSError:
                pass
            time.sleep(1)
        assert set(runs) == {"a/logs/train", "a/logs/validation", "a/logs/images", "b/logs"}
        tags = _get(url + "/data/plugin/scalars/tags")
        assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(tags["a/logs/train"])
        assert {"epoch_loss", "epoch_accuracy"} <= set(tags["a/logs/validation"])

        experiment = _get(url + "/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = {h["name"]: h for h in experiment["hparamInfos"]}
        assert set(infos) == set(HPARAMS)
        assert sorted(infos["base"]["domainDiscrete"]) == ["other", "tiny"]
        metrics = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
        assert {("", "epoch_loss"), ("", "hparams/val_accuracy")} <= metrics

        groups = _get(
            url + "/data/plugin/hparams/session_groups",
            {
                "startIndex": 0,
                "sliceSize": 10,
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
            },
        )["sessionGroups"]
        assert {g["name"] for g in groups} == {"a", "b"}  # trial ids, relative
        values = {
            g["hparams"]["base"]: {
                m["name"]["tag"]: m["value"] for m in g["metricValues"] if not m["name"]["group"]
            }
            for g in groups
        }
        assert values["other"]["hparams/val_accuracy"] == 0.25
        assert "hparams/val_accuracy" in values["tiny"]
    finally:
        server.terminate()
        server.wait(timeout=30)
