"""`tlkeras ensemble` and `tlkeras distill` on folders of small images, run as a user runs them.

Two members are trained with `tlkeras train` on tiny bases of different input sizes (16 and 24
px, weights none); the commands run in-process through `tlkeras.cli.main(argv)`. Marked heavy:
the two exports it checks (SavedModel, TFLite, verified) dominate its time.
"""

import csv
import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

from tlkeras import cli
from tlkeras.export import run_tflite

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_images(folder, n, rng, size=20, labeled=True):
    for name, color in COLORS.items():
        target = os.path.join(folder, name if labeled else "")
        os.makedirs(target, exist_ok=True)
        for i in range(n):
            pixels = np.clip(np.array(color) + rng.integers(-40, 40, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(os.path.join(target, f"{name}{i}.png"))


def tiny_base(size, width, path):
    keras.utils.set_random_seed(size)
    keras.Sequential([keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255.0),
                      keras.layers.Conv2D(width, 3, strides=2, activation="relu"),
                      keras.layers.Conv2D(width, 3, activation="relu")],
                     name=f"base{size}").save(path)


def images_of(folder, size):
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize(size), "float32")
                     for f in files])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Labeled train and held-out folders, unlabeled images, and two trained member runs."""
    root = tmp_path_factory.mktemp("fusion_cli")
    rng = np.random.default_rng(0)
    write_images(root / "train", 6, rng)
    write_images(root / "held_out", 3, rng)
    write_images(root / "unlabeled", 4, rng, labeled=False)
    for name, size, width in (("a", 16, 6), ("b", 24, 8)):
        tiny_base(size, width, root / f"base_{name}.keras")
        status = cli.main(["train", "--image_dir", root / "train", "--base",
                           root / f"base_{name}.keras", "--weights", "none", "--head_epochs", "2",
                           "--fine_tune_epochs", "0", "--head_learning_rate", "0.05",
                           "--batch_size", "6", "--seed", "1", "--run_dir", root / f"run_{name}"])
        assert status == 0
    return root


@pytest.mark.heavy  # two trainings, two exports with verification (TFLite, SavedModel)
def test_ensemble_and_distill_write_models_that_load_and_predict(runs, capsys):
    # tlkeras ensemble: fitted on the held-out folder, evaluated and exported.
    fused_dir = runs / "fused"
    assert cli.main(["ensemble", "--models", runs / "run_a", runs / "run_b", "--image_dir",
                     runs / "held_out", "--output_dir", fused_dir, "--method", "weighted"]) == 0
    out = capsys.readouterr().out
    assert "weighted of 2 models: accuracy" in out and "9 images" in out, out
    for name in ("model.keras", "model.tflite", "labels.txt", "saved_model/saved_model.pb"):
        assert (fused_dir / name).exists(), name
    assert (fused_dir / "labels.txt").read_text().split() == sorted(COLORS)
    assert any((fused_dir / "evaluation").iterdir())
    fused = keras.saving.load_model(fused_dir / "model.keras", safe_mode=True)
    assert fused.input_shape == (None, 24, 24, 3) and fused.output_shape == (None, 3)
    x = images_of(runs / "held_out", (24, 24))
    p = fused.predict(x, verbose=0)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(run_tflite(fused_dir / "model.tflite", x), p, atol=1e-4)
    members = [keras.saving.load_model(runs / f"run_{n}" / "model.keras") for n in "ab"]
    weights = fused.get_layer("predictions").member_weights
    mean = sum(w * m.predict(keras.ops.image.resize(x, m.input_shape[1:3]), verbose=0)
               for w, m in zip(weights, members))
    np.testing.assert_allclose(p, mean, atol=1e-4)

    # tlkeras distill: that ensemble into MobileNet at 32 px (a registry student; its export is
    # most of this test's time: MobileNet takes half of MobileNetV3Small's), with unlabeled images.
    run_dir, export_dir = runs / "student_run", runs / "student"
    assert cli.main(["distill", "--teacher", fused_dir, "--student", "MobileNet",
                     "--weights", "none", "--image_size", "32", "--image_dir", runs / "train",
                     "--validation_split", "0.25", "--unlabeled_dir", runs / "unlabeled",
                     "--epochs", "1", "--batch_size", "8", "--seed", "0", "--run_dir", run_dir,
                     "--export_dir", export_dir, "--quantize", "float16"]) == 0
    out = capsys.readouterr().out
    assert "teacher: validation accuracy" in out and "student: validation accuracy" in out, out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["student"].startswith("mobilenet_1.00_32") and config["unlabeled_data"] is True
    with open(run_dir / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 1  # one epoch
    for name in ("model.keras", "model.tflite", "labels.txt"):
        assert (export_dir / name).exists(), name
    student = keras.saving.load_model(export_dir / "model.keras", safe_mode=True)
    assert student.input_shape == (None, 32, 32, 3) and student.output_shape == (None, 3)
    trained = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)
    x = images_of(runs / "held_out", (32, 32))
    p = student.predict(x, verbose=0)
    np.testing.assert_allclose(p, trained.predict(x, verbose=0), atol=1e-5)
    lite = run_tflite(export_dir / "model.tflite", x)  # float16 weights: close, not equal
    assert lite.shape == p.shape and np.abs(lite - p).max() < 0.1, np.abs(lite - p).max()
