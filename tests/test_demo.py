"""`tlkeras demo --quick`, the README's main job: offline, transfer beats scratch on few labels.

The test runs `--quick` at its smallest budget only (`--budgets 1`: quick's two seeds, half its
runs); `test_quick_mode_compares_two_budgets_with_two_seeds` checks what `--quick` alone picks.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from tlkeras import demo

BUDGET = demo.QUICK_BUDGETS[0]  # the smallest budget, where transfer matters most


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    script = os.path.join(os.path.dirname(sys.executable), "tlkeras")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "tlkeras.cli"]
    result = subprocess.run([*command, "demo", "--quick", "--budgets", str(BUDGET),
                             "--run_dir", str(run_dir)],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result.stdout


def test_transfer_beats_scratch_at_the_smallest_budget(quick_demo):
    run_dir, stdout = quick_demo
    results = json.loads((run_dir / "results.json").read_text())
    rows = results["rows"]
    assert [r["labels_per_class"] for r in rows] == [BUDGET]  # --budgets reaches run_demo
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


def test_quick_mode_compares_two_budgets_with_two_seeds():
    assert demo._plan(True, None, None) == (list(demo.QUICK_BUDGETS), 2)
    assert len(demo.QUICK_BUDGETS) == 2 and demo._plan(True, [5, 1], None) == ([1, 5], 2)
    assert demo._plan(False, None, None) == (list(demo.BUDGETS), 3)
    assert demo._plan(False, [3], 1) == ([3], 1)


def test_demo_network_has_batch_normalization():
    import keras

    body = demo.small_cnn()
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in body.layers)
    x, y = demo.load_digits_rgb()
    assert x.shape == (1797, 16, 16, 3) and x.dtype == "uint8" and set(y) == set(range(10))


def test_tensorboard_runs_are_listed_once_with_validation_images_and_hparams(quick_demo):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    run_dir, _ = quick_demo
    events = glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True)
    runs = {os.path.relpath(os.path.dirname(e), run_dir) for e in events}
    # One TensorBoard run per folder Keras writes: nothing in `logs/` itself, no absolute paths.
    methods = [f"{m}_k{k}_seed{s}" for m in ("transfer", "scratch") for k in (BUDGET,)
               for s in (0, 1)]
    assert runs == {"summary/transfer", "summary/scratch", "pretrain/logs/train",
                    "pretrain/logs/validation",
                    *(f"{name}/logs/{sub}" for name in methods
                      for sub in ("train", "validation", "images"))}

    def read(path):
        accumulator = EventAccumulator(str(run_dir / path), size_guidance={"tensors": 0})
        return accumulator.Reload()

    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["labels_per_class"]: r for r in results["rows"]}
    sessions = {}
    for name in methods:
        method, k, seed = name.split("_")
        k, seed = int(k[1:]), int(seed[4:])
        validation = read(f"{name}/logs/validation")
        accuracy = {e.step: float(tf.make_ndarray(e.tensor_proto))
                    for e in validation.Tensors("epoch_accuracy")}
        assert sorted(accuracy) == list(range(11 if method == "transfer" else 6)), name
        images = read(f"{name}/logs/images")
        assert set(images.PluginTagToContent("images")) == {"confusion_matrix", "grad_cam"}
        for tag in ("confusion_matrix", "grad_cam"):  # twice a run
            steps = [e.step for e in images.Tensors(tag)]
            assert steps == ([4, 9] if method == "transfer" else [2, 5]), (name, tag)
        train = read(f"{name}/logs/train")
        info = hparams_metadata.parse_session_start_info_plugin_data(
            train.PluginTagToContent("hparams")[hparams_metadata.SESSION_START_INFO_TAG])
        sessions[name] = (info.group_name, {key: v.string_value or v.number_value
                                            for key, v in info.hparams.items()})
        assert sessions[name] == (name, {"method": method, "labels_per_class": k, "seed": seed})
        rows[k].setdefault(f"{method}_last_val", []).append(accuracy[max(accuracy)])
    # The validation curves end at the accuracy the table reports (the same held-out digits).
    for r in rows.values():
        for method in ("transfer", "scratch"):
            assert sum(r[f"{method}_last_val"]) / 2 == pytest.approx(r[method], abs=1e-3)
