"""`tlkeras demo --quick`, the README's main job: offline, transfer beats scratch on few labels."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tlkeras import demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    script = os.path.join(os.path.dirname(sys.executable), "tlkeras")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "tlkeras.cli"]
    result = subprocess.run([*command, "demo", "--quick", "--run_dir", str(run_dir)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result.stdout


def test_transfer_beats_scratch_at_the_smallest_budget(quick_demo):
    run_dir, stdout = quick_demo
    results = json.loads((run_dir / "results.json").read_text())
    rows = results["rows"]
    assert [r["labels_per_class"] for r in rows] == list(demo.QUICK_BUDGETS)
    assert all(r["seeds"] == 2 for r in rows)
    smallest = rows[0]
    assert smallest["transfer"] > smallest["scratch"], rows
    assert results["source_accuracy"] > 0.7  # the source task was learned
    # The printed table holds the same numbers.
    assert "labels/class" in stdout and f"{smallest['transfer']:.3f}" in stdout
    assert f"tensorboard --logdir {run_dir}" in stdout


def test_run_folder_has_tensorboard_logs(quick_demo):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = quick_demo
    assert (run_dir / "pretrained_base.keras").is_file()
    for run in ("pretrain", "transfer_k1_seed0", "scratch_k1_seed1"):
        pattern = str(run_dir / run / "logs" / "**" / "events.out.tfevents.*")
        assert glob.glob(pattern, recursive=True), run
    assert (run_dir / "transfer_k1_seed0" / "model.keras").is_file()  # a fine_tune run folder
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["labels_per_class"]: r for r in results["rows"]}
    for method in ("transfer", "scratch"):
        events = EventAccumulator(str(run_dir / "summary" / method), size_guidance={"tensors": 0})
        events.Reload()
        logged = {e.step: float(tf.make_ndarray(e.tensor_proto))
                  for e in events.Tensors("test_accuracy_vs_labels_per_class")}
        assert logged == pytest.approx({k: r[method] for k, r in rows.items()})


def test_demo_network_has_batch_normalization():
    import keras

    body = demo.small_cnn()
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in body.layers)
    x, y = demo.load_digits_rgb()
    assert x.shape == (1797, 16, 16, 3) and x.dtype == "uint8" and set(y) == set(range(10))
