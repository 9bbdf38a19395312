"""The `tlkeras` command line, driven as a user drives it: in a subprocess, on folders of files.

The models are small: a tiny convolutional base saved as a .keras file (`--base base.keras`),
16x16 images. The main flows run the installed console script; the remaining subcommands and
error messages run through `tlkeras.cli.main(argv)`, the function the console script calls.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tlkeras import cli

TLKERAS = os.path.join(os.path.dirname(sys.executable), "tlkeras")
RED, BLUE = (220, 30, 30), (30, 30, 220)
# TensorFlow's own C++ start-up log lines, printed before Python runs any tlkeras code.
TF_LOG = re.compile(r"^(WARNING: All log messages before absl|[IWEF]\d{4} |To enable the follow)")


def run(*args, cwd, env=None, check=True):
    command = [TLKERAS if os.path.exists(TLKERAS) else sys.executable, *(
        [] if os.path.exists(TLKERAS) else ["-m", "tlkeras.cli"]), *map(str, args)]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def assert_one_error_line(stderr, *fragments):
    """stderr ends with one `tlkeras <command>: error: ...` line and has no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and not TF_LOG.match(line)]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if re.match(r"^tlkeras( \w+)?: error: ", line)]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def write_images(folder, classes, n, rng, size=20):
    for name, color in classes.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3)) if color is None else \
                np.clip(np.array(color) + rng.integers(-25, 25, (size, size, 3)), 0, 255)
            from PIL import Image

            Image.fromarray(pixels.astype("uint8")).save(os.path.join(folder, name, f"{i}.png"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Folders of images (easy: solid red vs blue, with a corrupt file; hard: noise with random
    labels; new: unseen red and blue images) and a tiny base model file."""
    import keras

    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    write_images(root / "easy", {"red": RED, "blue": BLUE}, 16, rng)
    (root / "easy" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a real jpeg")
    write_images(root / "new", {"red": RED, "blue": BLUE}, 2, rng, size=40)
    write_images(root / "hard", {"a": None, "b": None}, 10, rng)
    keras.utils.set_random_seed(0)
    base = keras.Sequential([
        keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1),
        keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.BatchNormalization(),
        keras.layers.Conv2D(8, 3, activation="relu")], name="tiny_base")
    base.save(root / "base.keras")
    return root


TRAIN = ["--base", "base.keras", "--weights", "none", "--batch_size", "4",
         "--learning_rate", "0.05", "--fine_tune_epochs", "1", "--seed", "1"]


@pytest.fixture(scope="module")
def trained(work):
    """`tlkeras train` with a YAML config and flags overriding it, exporting everything."""
    (work / "a.yaml").write_text(
        "image_dir: easy\nhead_epochs: 99\nvalidation_split: 0.25\nl2: 0.0001\n")
    result = run("train", "--config", "a.yaml", *TRAIN, "--head_epochs", "4", "--run_dir", "run1",
                 "--saved_model_dir", "out/sm", "--tflite_output_file", "out/model.tflite",
                 "--labels_output_file", "out/labels.txt", cwd=work)
    return result


def test_train_exports_and_records_its_config(work, trained):
    assert "broken.jpg" in trained.stderr  # the corrupt file is skipped and named
    assert "Validation accuracy 1.0000" in trained.stdout
    config = json.loads((work / "run1" / "cli_config.json").read_text())
    assert config["head_epochs"] == 4 and config["validation_split"] == 0.25  # flag > file
    assert config["l2"] == 0.0001
    assert (work / "out" / "labels.txt").read_text() == "blue\nred\n"
    assert (work / "out" / "sm" / "saved_model.pb").is_file()
    assert os.listdir(work / "run1" / "logs")  # TensorBoard event files
    history = (work / "run1" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4 + 1  # header, 4 head epochs, 1 fine-tune epoch

    import keras
    import tensorflow as tf

    from tlkeras.export import run_tflite

    model = keras.saving.load_model(work / "run1" / "model.keras")
    dense = model.get_layer("predictions")
    assert dense.kernel_regularizer.get_config()["l2"] == pytest.approx(1e-4)
    images = np.stack([np.full((16, 16, 3), RED, "float32"), np.full((16, 16, 3), BLUE, "float32")])
    np.testing.assert_allclose(run_tflite(str(work / "out" / "model.tflite"), images),
                               model.predict(images, verbose=0), atol=1e-4)
    served = tf.saved_model.load(str(work / "out" / "sm")).signatures["serving_default"](
        images=tf.constant(images))
    assert [c.decode() for c in served["classes"].numpy()] == ["red", "blue"]


def test_predict_new_files_top1(work, trained, monkeypatch):
    run("predict", "--model", "run1", "new", "--top_k", "2", "--output", "predictions.csv",
        cwd=work)
    import csv

    with open(work / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for row in rows:
        assert row["label_1"] == os.path.basename(os.path.dirname(row["file"])), row
        assert float(row["probability_1"]) > 0.5 > float(row["probability_2"])
    monkeypatch.chdir(work)
    argv = ["predict", "--model", "run1/model.keras", "new/red/0.png", "--output", "p.json"]
    assert cli.main(argv) == 0
    predictions = json.loads((work / "p.json").read_text())
    assert [p["label"] for p in predictions[0]["predictions"]] == ["red", "blue"]


def test_config_file_reproduces_a_run(work, trained):
    run("train", "--config", "run1/cli_config.json", "--run_dir", "run2", "--saved_model_dir", "",
        "--tflite_output_file", "", "--labels_output_file", "", cwd=work)
    first, second = (np.genfromtxt(work / r / "history.csv", delimiter=",", names=True)
                     for r in ("run1", "run2"))
    assert first.dtype.names == second.dtype.names
    for name in first.dtype.names:
        np.testing.assert_allclose(first[name], second[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_fine_tune_options_reach_the_run_folder_and_tta_evaluates(work, capsys, monkeypatch):
    """layer decay, gradual unfreezing, EMA, MixUp, an augmentation preset and 'find' from the
    command line; then `evaluate --tta` on the run."""
    monkeypatch.chdir(work)
    assert cli.main(["train", "--image_dir", "easy", *TRAIN, "--head_epochs", "1",
                     "--fine_tune_epochs", "2", "--unfreeze", "2", "--layer_decay", "0.5",
                     "--gradual_unfreeze", "1", "--ema", "--mix", "mixup",
                     "--augmentation", "light", "--fine_tune_learning_rate", "find",
                     "--validation_split", "0.25", "--run_dir", "options"]) == 0
    config = json.loads((work / "options" / "config.json").read_text())
    assert (config["layer_decay"], config["gradual_unfreeze"], config["ema"], config["mix"]) == (
        0.5, 1, True, "mixup")
    assert config["fine_tune_learning_rate"] == "find"
    assert (work / "options" / "lr_find_fine_tune.png").is_file()  # the sweep phase 2 used
    assert json.loads((work / "options" / "cli_config.json").read_text())["augmentation"] == "light"
    import keras

    model = keras.saving.load_model(work / "options" / "model.keras")
    assert type(model.optimizer).__name__ == "LayerwiseAdam" and model.optimizer.use_ema
    assert model.get_layer("augmentation") is not None
    # evaluate --tta: noise images labelled red/blue give mistakes whose confidence is the
    # flip-averaged probability (predict(tta=True) is checked against the views in test_predict).
    write_images(work / "noisy", {"red": None, "blue": None}, 4, np.random.default_rng(3))
    assert cli.main(["evaluate", "--model", "options", "--image_dir", "noisy", "--tta",
                     "--output_dir", "ev_tta"]) == 0
    mistakes = json.loads((work / "ev_tta" / "report.json").read_text())["mistakes"]
    assert mistakes
    import tlkeras

    for mistake in mistakes:
        by_tta = tlkeras.predict("options", mistake["file"], tta=True)  # the run: its names
        assert by_tta.labels[0] == mistake["predicted"]
        assert by_tta.probabilities.max() == pytest.approx(mistake["confidence"], abs=1e-5)


def test_assert_accuracy_fails_and_exports_nothing(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    status = cli.main(["train", "--image_dir", "hard", *TRAIN, "--head_epochs", "1",
                       "--fine_tune_epochs", "0", "--validation_split", "0.5",
                       "--assert_accuracy_at_least", "0.99", "--run_dir", "run3",
                       "--saved_model_dir", "out3/sm", "--tflite_output_file", "out3/model.tflite",
                       "--labels_output_file", "out3/labels.txt"])
    assert status == 1
    assert_one_error_line(capsys.readouterr().err, "below --assert_accuracy_at_least 0.99",
                          "nothing was exported")
    assert not (work / "out3").exists()


def test_user_errors_print_one_line(work):
    """A failed download, in a subprocess (bad flags and paths: test_user_errors_in_process)."""
    # Offline: no Keras cache and an unreachable proxy, so the weights download fails at once.
    env = {"KERAS_HOME": str(work / "empty_keras_home"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    result = run("train", "--image_dir", "easy", "--base", "MobileNetV2", "--image_size", "32",
                 "--head_epochs", "1", cwd=work, env=env, check=False)
    assert result.returncode == 1, result.stderr
    line = assert_one_error_line(result.stderr,
                                 "Could not download ImageNet weights for MobileNetV2")
    assert "--weights PATH" in line  # says what to do offline


@pytest.mark.parametrize("argv, status, fragment", [
    (["train", "--image_dir", "easy", "--head_epochs", "two"], 2,
     "argument --head_epochs: expected an integer, received 'two'"),
    (["train", "--image_dir", "no/such/folder"], 2, "argument --image_dir: no such folder"),
    (["train", "--image_dir", "easy", "--csv", "x.csv"], 2, "argument --csv: no such file"),
    (["train", "--image_dir", "easy", "--tfds", "mnist"], 2, "exactly one data source"),
    (["train", "--image_dir", "easy", "--base", "MobilNetV2"], 2, "did you mean MobileNetV2?"),
    (["train", "--image_dir", "easy", "--weights", "missing.h5"], 2, "argument --weights"),
    (["train", "--image_dir", "easy", "--validation_split", "1.5"], 2, "a value in [0, 0.9]"),
    (["train", "--config", "bad.yaml"], 2, "unknown setting 'epochs'"),
    (["train", "--image_dir", "easy", "--optimizer", "adam", "--momentum", "0.9"], 2, "--momentum"),
    (["predict", "--model", "nowhere.keras", "new"], 2, "argument --model: no such path"),
    (["predict", "--model", "easy", "new"], 2, "holds no model.keras"),
    (["scan", "easy", "--strict"], 1, "1 bad file(s)"),
    (["weights", "NoSuchNet"], 1, "Unknown backbone 'NoSuchNet'"),
    (["nosuchcommand"], 2, "invalid choice"),
])
def test_user_errors_in_process(work, capsys, monkeypatch, argv, status, fragment):
    monkeypatch.chdir(work)
    (work / "bad.yaml").write_text("image_dir: easy\nepochs: 3\n")
    assert cli.main(argv) == status
    assert_one_error_line(capsys.readouterr().err, fragment)


def test_evaluate_export_scan(work, trained, capsys, monkeypatch):
    monkeypatch.chdir(work)
    assert cli.main(["evaluate", "--model", "run1", "--image_dir", "new", "--output_dir",
                     "ev"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"accuracy: 1\.0000", out), out
    report = json.loads((work / "ev" / "report.json").read_text())
    assert report["num_samples"] == 4 and report["confusion_matrix"] == [[2, 0], [0, 2]]

    assert cli.main(["export", "--model", "run1", "--output_dir", "exp", "--formats", "keras"]) == 0
    assert (work / "exp" / "model.keras").is_file()
    assert (work / "exp" / "labels.txt").read_text() == "blue\nred\n"

    assert cli.main(["scan", "easy", "--report", "scan.json"]) == 0
    scan = json.loads((work / "scan.json").read_text())
    assert scan["counts"]["good"] == 32 and scan["bad"][0]["path"].endswith("broken.jpg")


def test_backbones_and_weights(work, capsys, monkeypatch):
    import keras

    monkeypatch.chdir(work)
    assert cli.main(["backbones"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert re.match(r"MobileNetV2\s+224\s+32\s+1280\s+tf\s+mobilenet_v2", next(
        line for line in table if line.startswith("MobileNetV2 ")))
    assert sum(1 for line in table if re.match(r"^\w+\s+\d+\s+\d+\s+\d+\s", line)) == 40

    assert cli.main(["weights", "ResNet50"]) == 0
    out = capsys.readouterr().out
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in out and "https://" in out

    keras.applications.MobileNetV2(include_top=False, weights=None).save_weights("mnv2.weights.h5")
    assert cli.main(["weights", "MobileNetV2", "--verify", "mnv2.weights.h5"]) == 0
    assert capsys.readouterr().out.startswith("OK: mnv2.weights.h5 matches MobileNetV2")
    assert cli.main(["weights", "MobileNetV2", "--verify", "base.keras"]) == 1
    assert_one_error_line(capsys.readouterr().err, "matches the architecture 'mobilenetv2")


def test_registry_base_at_small_size_and_tune(work, capsys, monkeypatch):
    """--base MobileNetV2 --image_size 32 --weights none trains; `tlkeras tune` searches."""
    monkeypatch.chdir(work)
    assert cli.main(["train", "--image_dir", "easy", "--base", "MobileNetV2", "--image_size", "32",
                     "--weights", "none", "--head_epochs", "1", "--fine_tune_epochs", "1",
                     "--unfreeze", "1", "--validation_split", "0", "--run_dir", "mnv2",
                     "--hidden_units", "8",
                     "--augmentation", "light", "--random_zoom", "0.1"]) == 0
    import keras

    model = keras.saving.load_model(work / "mnv2" / "model.keras")
    assert model.input_shape == (None, 32, 32, 3) and model.get_layer("head_dense_0").units == 8
    assert not (work / "mnv2" / "feature_cache").exists()  # augmented images: no feature cache

    assert cli.main(["tune", "--image_dir", "easy", "--base", "base.keras", "--weights", "none",
                     "--tuner", "random", "--max_trials", "2", "--max_epochs", "1",
                     "--head_epochs", "2", "--unfreeze_depths", "0,1", "--learning_rates", "0.001",
                     "--directory", "tuning",
                     "--batch_size", "4", "--export_dir", "best"]) == 0
    out = capsys.readouterr().out
    assert "Best: {" in out
    trials = (work / "tuning" / "tlkeras" / "trials.csv").read_text().splitlines()
    assert len(trials) == 3
    assert (work / "best" / "labels.txt").read_text() == "blue\nred\n"


def test_help_on_every_subcommand(capsys):
    for command in ("train", "tune", "evaluate", "predict", "export", "scan", "backbones",
                    "weights", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: tlkeras {command}" in capsys.readouterr().out
