"""Nothing lost, nothing silently wrong: the promises tlkeras keeps under faults and bad input.

Each test is named after the promise it checks. Faults are made for real: kill -9 of a child
process, a second process holding the run folder, a full and a read-only filesystem (tmpfs
mounts, skipped with the reason where the machine does not allow them).
"""

import contextlib
import csv
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from PIL import Image

import tlkeras
from conftest import REPO
from tlkeras import runs

SIZE = 16
CLASSES = ["a", "b", "c"]


def tiny_model(num_classes=3, task="multiclass", size=SIZE):
    base = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
    ], name="tiny_cnn")
    return tlkeras.build_transfer_model(base, num_classes, task=task)


def arrays(n=48, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, SIZE, SIZE, 3)).astype("float32")
    return x, (np.arange(n) % classes).astype("int32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny model trained by fine_tune from (x, y) tuples, and its run folder."""
    keras.utils.set_random_seed(0)
    run = tmp_path_factory.mktemp("trained") / "run"
    model = tiny_model()
    result = tlkeras.fine_tune(model, arrays(), arrays(24, seed=1), head_epochs=1,
                               fine_tune_epochs=1, log_dir=str(run), class_names=CLASSES,
                               verbose=0)
    return model, run, result


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write_images(folder, counts, size=SIZE):
    """PNGs of random pixels: {class: n} -> folder/class/i.png."""
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, name, f"{i}.png"))


def child(code, *args):
    """A Python child process running `code` with this worktree's tlkeras."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


@contextlib.contextmanager
def tmpfs(path, options):
    """A small tmpfs mounted at `path`; skips the test where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------ data lost


def test_a_reexport_killed_midway_leaves_the_previous_export_whole(tmp_path):
    out = tmp_path / "export"
    keras.utils.set_random_seed(1)
    model = tiny_model()
    tlkeras.export_model(model, out, formats="keras", class_names=CLASSES)
    before = {name: digest(out / name) for name in os.listdir(out)}
    # A second model's export, killed (SIGKILL) once model.keras is written, in the SavedModel.
    proc = child("""
        import os, signal, sys, keras, tlkeras
        from tlkeras import export
        from test_reliability import tiny_model, CLASSES
        keras.utils.set_random_seed(2)
        model = tiny_model()
        export._export_saved_model = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        tlkeras.export_model(model, sys.argv[1], formats=("keras", "saved_model"),
                             class_names=["x", "y", "z"])
    """, out)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert {name: digest(out / name) for name in os.listdir(out)} == before
    reloaded = keras.saving.load_model(out / "model.keras")
    x = arrays(4)[0]
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_resuming_with_another_model_is_refused_before_anything_is_written(trained, tmp_path):
    _, run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    files = ("config.json", "history.csv", "model.keras", "checkpoints/best.weights.h5")
    before = {f: digest(copy / f) for f in files}
    with pytest.raises(runs.RunFolderMismatchError, match=r"outputs: the folder has 3, this run 4"):
        tlkeras.fine_tune(tiny_model(4), arrays(classes=4), log_dir=str(copy), head_epochs=1,
                          fine_tune_epochs=0, verbose=0)
    assert {f: digest(copy / f) for f in files} == before
    assert not (copy / ".lock").exists()


# ----------------------------------------------------------- silently wrong


def test_a_run_folder_is_locked_while_in_use_and_a_killed_owners_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    owner = child("""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("runs", sys.argv[2])  # stdlib only: fast
        runs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runs)
        runs.RunLock(sys.argv[1]).acquire()
        print("locked", flush=True)
        time.sleep(300)
    """, folder, runs.__file__)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunFolderInUseError, match=f"in use by pid {owner.pid}"):
            tlkeras.fine_tune(tiny_model(), arrays(), log_dir=str(folder), head_epochs=1,
                              fine_tune_epochs=0, verbose=0)
        assert os.listdir(folder) == [".lock"]  # the second user wrote nothing
    finally:
        owner.kill()  # kill -9: the lock stays behind, stale
        owner.wait()
    assert (folder / ".lock").exists()
    result = tlkeras.fine_tune(tiny_model(), arrays(), log_dir=str(folder), head_epochs=1,
                               fine_tune_epochs=0, verbose=0)
    assert len(result.history["loss"]) == 1 and (folder / "config.json").exists()
    assert not (folder / ".lock").exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    x, y = arrays()
    model = tiny_model()
    folder = tmp_path / "run"
    message = r"(loss became nan|non-finite weights) at epoch (\d+)"
    with pytest.raises(tlkeras.validation.NonFiniteLossError, match=message) as info:
        tlkeras.fine_tune(model, (x * 1e36, y), log_dir=str(folder), head_epochs=3,
                          fine_tune_epochs=1, learning_rate=10.0, cache_features=False, seed=0,
                          verbose=0)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert not (folder / "model.keras").exists()
    if int(re.search(message, str(info.value)).group(2)) > 1:  # an epoch ended well: kept
        restored = tiny_model()
        restored.load_weights(folder / "checkpoints" / "best.weights.h5")
        assert all(np.isfinite(w).all() for w in restored.get_weights())


def test_fine_tune_accepts_arrays_as_keras_fit_does(trained):
    _, run, result = trained
    assert len(result.history["loss"]) == 2 and np.isfinite(result.history["loss"]).all()
    assert (run / "model.keras").exists() and not (run / ".lock").exists()


def bad_pairs():
    x, y = arrays()
    nan_x = x.copy()
    nan_x[5, 1, 2, 0] = np.nan
    return {
        "labels out of range": (3, (x, y + 1), "label 3 .* out of range"),
        "one-hot labels": (3, (x, np.eye(3, dtype="float32")[y]), "one-hot"),
        "fractional labels": (3, (x, y + 0.5), "integer class ids, received label 0.5"),
        "binary model, 3 classes": ("binary", (x, y), "task 'binary' takes labels 0 and 1"),
        "2-class model, 3 named classes": (2, tlkeras.data.from_arrays(
            x, y % 2, class_names=CLASSES), "the data has 3 classes"),
        "other image size": (3, (x[:, :8, :8], y), r"takes images of shape \(16, 16, 3\), "
                             r"received images of shape \(8, 8, 3\)"),
        "text to an image model": (3, (np.array(["a text"] * 4), y[:4]), "received text"),
        "NaN pixel": (3, (nan_x, y), "pixel values must be finite; sample 5"),
        "NaN label": ("regression", (x, np.where(y == 2, np.nan, y)), "label values must be fin"),
    }


@pytest.mark.parametrize("case", list(bad_pairs()))
def test_a_model_and_data_that_do_not_fit_get_one_line_naming_the_argument(case):
    classes, data, message = bad_pairs()[case]
    if classes == "binary":
        model = tiny_model(1, task="binary")
    elif classes == "regression":
        model = tiny_model(1, task="regression")
    else:
        model = tiny_model(classes)
    with pytest.raises(ValueError, match="train_data: .*" + message):
        tlkeras.fine_tune(model, data, head_epochs=1, fine_tune_epochs=0, verbose=0)


def test_a_text_model_given_images_gets_one_line():
    with pytest.raises(ValueError, match="train_data: the model .* takes text"):
        tlkeras.validation.check_model_data(tiny_text_model(), arrays(8, classes=2))


def test_a_negative_learning_rate_or_unknown_optimizer_is_refused_before_anything_is_written(
        tmp_path):
    with pytest.raises(ValueError, match="received 'adamx'"):
        tlkeras.fine_tune(tiny_model(), arrays(), optimizer="adamx", log_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="learning_rate=-0.001"):
        tlkeras.fine_tune(tiny_model(), arrays(), learning_rate=-1e-3, verbose=0)
    with pytest.raises(ValueError, match="fine_tune_learning_rate=0"):
        tlkeras.fine_tune(tiny_model(), arrays(), fine_tune_learning_rate=0, verbose=0)


def test_tune_refuses_bad_search_values_and_unknown_optimizers_before_any_trial(tmp_path):
    train = tlkeras.data.from_arrays(*arrays(), class_names=CLASSES)
    cases = [({"learning_rate": [1e-3, -1e-3]}, r"search_space\['learning_rate'\]: .* -0.001"),
             ({"dropout": 1.5}, r"search_space\['dropout'\]: .* 1.5"),
             ({"optimizer": ["adam", "adamx"]}, r"search_space\['optimizer'\]: .* 'adamx'")]
    for space, message in cases:
        with pytest.raises(ValueError, match=message):
            tlkeras.tune(tiny_model(), train, train, search_space=space, directory=tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_symlink_loop_reads_each_real_file_once_and_splits_without_overlap(tmp_path):
    write_images(tmp_path / "data", {"a": 4, "b": 4})
    os.symlink("..", tmp_path / "data" / "a" / "loop")
    os.symlink("../a/0.png", tmp_path / "data" / "b" / "same.png")
    train, val = tlkeras.data.from_directory(tmp_path / "data", SIZE, validation_split=0.25,
                                             subset="both", seed=0)
    files = [os.path.realpath(p) for p in train.file_paths + val.file_paths]
    assert len(files) == 8 and len(set(files)) == 8


def write_csv(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows([["file", "label"], *rows])


def test_csv_rows_are_split_by_file_and_conflicting_labels_are_refused(tmp_path):
    write_images(tmp_path, {"img": 8})
    rows = [[f"img/{i}.png", "ab"[i % 2]] for i in range(8)]
    write_csv(tmp_path / "dup.csv", rows + rows[:4])  # four rows twice
    train, val = tlkeras.data.from_csv(tmp_path / "dup.csv", "file", "label", image_size=SIZE,
                                       validation_split=0.25, subset="both", seed=0)
    assert len(train.file_paths) + len(val.file_paths) == 8
    assert not set(train.file_paths) & set(val.file_paths)
    write_csv(tmp_path / "conflict.csv", rows + [["img/0.png", "b"]])
    with pytest.raises(ValueError, match=r"'img/0.png' is listed with two labels .* line 2 .* "
                                         r"line 10"):
        tlkeras.data.from_csv(tmp_path / "conflict.csv", "file", "label", image_size=SIZE)
    multi = tlkeras.data.from_csv(tmp_path / "conflict.csv", "file", "label", image_size=SIZE,
                                  label_sep="|")
    assert multi.labels.shape == (8, 2) and multi.labels[0].tolist() == [1.0, 1.0]


def test_an_empty_label_cell_is_an_error_naming_its_line(tmp_path):
    write_images(tmp_path, {"img": 3})
    write_csv(tmp_path / "l.csv", [["img/0.png", "a"], ["img/1.png", ""], ["img/2.png", "b"]])
    with pytest.raises(ValueError, match="Line 3 of .* empty 'label' cell"):
        tlkeras.data.from_csv(tmp_path / "l.csv", "file", "label", image_size=SIZE)


def test_a_csv_with_a_byte_order_mark_reads_and_latin1_names_the_line(tmp_path):
    write_images(tmp_path, {"img": 2})
    write_csv(tmp_path / "bom.csv", [["img/0.png", "a"], ["img/1.png", "b"]], "utf-8-sig")
    ds = tlkeras.data.from_csv(tmp_path / "bom.csv", "file", "label", image_size=SIZE)
    assert ds.class_names == ["a", "b"]
    write_csv(tmp_path / "latin.csv", [["img/0.png", "a"], ["img/1.png", "café"]], "latin-1")
    with pytest.raises(ValueError, match=r"Line 3 of .* is not UTF-8 .* save the CSV as UTF-8"):
        tlkeras.data.from_csv(tmp_path / "latin.csv", "file", "label", image_size=SIZE)


def test_a_file_replaced_by_same_size_garbage_is_caught_by_content_and_skipped_by_name(
        tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TLKERAS_CACHE_DIR", str(tmp_path / "cache"))
    write_images(tmp_path / "data", {"a": 3, "b": 3})
    ds = tlkeras.data.from_directory(tmp_path / "data", SIZE, shuffle=False, batch_size=2)
    victim = tmp_path / "data" / "a" / "1.png"
    stat = os.stat(victim)
    victim.write_bytes(b"x" * stat.st_size)  # same size, same time: only the content differs
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level("WARNING", logger="tlkeras.data"):
        images = sum(len(x) for x, _ in ds)  # the pipeline built before: skips it by name
    assert images == 5 and str(victim) in caplog.text
    again = tlkeras.data.from_directory(tmp_path / "data", SIZE)  # the scan cache: rescanned
    assert [p for p, _ in again.scan_report.bad] == [str(victim)]


def test_an_image_whose_name_is_not_utf8_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("TLKERAS_CACHE_DIR", str(tmp_path / "cache"))
    write_images(tmp_path / "data", {"a": 2, "b": 2})
    os.rename(tmp_path / "data" / "a" / "0.png",
              os.path.join(os.fsencode(tmp_path / "data" / "a"), b"caf\xe9.png"))
    ds = tlkeras.data.from_directory(tmp_path / "data", SIZE)
    assert sum(len(x) for x, _ in ds) == 4
    assert not ds.scan_report.bad and not ds.scan_report.converted


def test_image_size_and_batch_size_must_be_positive(tmp_path):
    x, y = arrays(8)
    with pytest.raises(ValueError, match="image_size=0"):
        tlkeras.data.from_arrays(x, y, image_size=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        tlkeras.data.from_arrays(x, y, batch_size=0)


def test_an_empty_text_class_folder_says_no_text_files(tmp_path):
    (tmp_path / "pos").mkdir()
    (tmp_path / "neg").mkdir()
    (tmp_path / "pos" / "1.txt").write_text("good")
    with pytest.raises(ValueError, match=r"neg: no text \(.txt\) files"):
        tlkeras.data.from_text_directory(tmp_path)


def test_evaluate_matches_classes_by_name_and_never_overwrites_a_report(trained, tmp_path):
    model = trained[0]
    x, y = arrays(12, classes=2, seed=3)  # the data knows two classes: "c" (0) and "a" (1)
    data = tlkeras.data.from_arrays(x, y, class_names=["c", "a"], shuffle=False)
    by_name = tlkeras.evaluate(model, data, CLASSES, output_dir=tmp_path)
    as_model = tlkeras.evaluate(model, (x, np.array([2, 0])[y]), CLASSES)
    assert by_name.confusion_matrix == as_model.confusion_matrix
    assert by_name.per_class["b"]["support"] == 0  # a subset of the model's classes
    with pytest.raises(FileExistsError, match="report.json exists .* overwrite=True"):
        tlkeras.evaluate(model, data, CLASSES, output_dir=tmp_path)
    tlkeras.evaluate(model, data, CLASSES, output_dir=tmp_path, overwrite=True)
    with pytest.raises(ValueError, match=r"data: the model .* takes images of shape \(16, 16, 3\)"):
        tlkeras.evaluate(model, (x[:, :8, :8], y), CLASSES)
    unknown = tlkeras.data.from_arrays(x, y, class_names=["a", "zebra"])
    with pytest.raises(ValueError, match=r"classes \['zebra'\] are not among the model's"):
        tlkeras.evaluate(model, unknown, CLASSES)


# ------------------------------------------------------------------- unclear errors


def test_a_full_disk_names_the_path_and_keeps_the_previous_export(tmp_path):
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        model = tiny_model()
        first = tlkeras.export_model(model, disk / "export", formats="keras")
        before = digest(first.paths["keras"])
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        with pytest.raises((OSError, tlkeras.ExportError), match="(?i)no space left") as info:
            tlkeras.export_model(model, disk / "export", formats="keras")
        assert str(disk / "export" / "model.keras") in str(info.value)
        assert digest(first.paths["keras"]) == before
        assert sorted(os.listdir(disk)) == ["export", "filler"]


def test_a_read_only_cache_folder_is_named_with_what_to_do(tmp_path, monkeypatch):
    write_images(tmp_path / "data", {"a": 2, "b": 2})
    with tmpfs(tmp_path / "ro", "size=64k,ro") as cache:
        monkeypatch.setenv("TLKERAS_CACHE_DIR", str(cache))
        with pytest.raises(OSError, match=f"cache folder {cache} is not writable .* "
                                          "TLKERAS_CACHE_DIR"):
            tlkeras.data.from_directory(tmp_path / "data", SIZE)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder: an unreadable class "
                    "folder cannot be made here")
def test_an_unreadable_class_folder_is_named(tmp_path):
    write_images(tmp_path / "data", {"a": 2, "b": 2})
    os.chmod(tmp_path / "data" / "b", 0)
    with pytest.raises(PermissionError, match="Cannot read the folder .*b"):
        tlkeras.data.from_directory(tmp_path / "data", SIZE)


def test_cli_resume_with_other_classes_rewrites_nothing_and_evaluate_keeps_the_runs_report(
        tmp_path, monkeypatch, capsys):
    from tlkeras import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLKERAS_CACHE_DIR", str(tmp_path / "cache"))
    write_images(tmp_path / "two", {"a": 6, "b": 6})
    write_images(tmp_path / "three", {"a": 4, "b": 4, "c": 4})
    base = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255.0),
                             keras.layers.Conv2D(4, 3, activation="relu")], name="tiny_base")
    base.save(tmp_path / "base.keras")
    train = ["train", "--base", "base.keras", "--weights", "none", "--batch_size", "4",
             "--head_epochs", "1", "--fine_tune_epochs", "0", "--run_dir", "run"]
    assert cli.main([*train, "--image_dir", "two", "--validation_split", "0.5"]) == 0
    kept = {f: digest(tmp_path / "run" / f) for f in ("cli_config.json", "config.json",
                                                      "labels.txt", "evaluation/report.json")}
    assert cli.main([*train, "--image_dir", "three"]) != 0
    assert "Cannot resume in" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", "run", "--image_dir", "two"]) == 0
    assert (tmp_path / "run" / "evaluation-2" / "report.json").exists()
    assert {f: digest(tmp_path / "run" / f) for f in kept} == kept


def test_from_tfds_offline_names_the_dataset_the_cause_and_what_to_do(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"no TFDS dataset is named 'mnistt'; close matches: "
                                         r"'mnist'"):
        tlkeras.data.from_tfds("mnistt", "train", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as error:
        tlkeras.data.from_tfds("mnist", "train", data_dir=str(tmp_path), download=False)
    assert re.fullmatch(r"from_tfds: TFDS dataset 'mnist' is not prepared in .*mnist.* "
                        r"\(download=False\)\. .*tfds build mnist.*data_dir=DIR.*",
                        str(error.value))
    try:
        tlkeras.data._check_network()
        pytest.skip("the network is up here: the offline download case cannot be made")
    except ConnectionError:
        pass
    with pytest.raises(RuntimeError) as error:  # no network: fails at once, not after retries
        tlkeras.data.from_tfds("mnist", "train", data_dir=str(tmp_path))
    assert re.fullmatch(r"from_tfds: TFDS dataset 'mnist' could not be downloaded into "
                        rf"{re.escape(str(tmp_path))}.*\(ConnectionError: no network.*\)\. "
                        r"To use it offline, .*data_dir=DIR, download=False\)\.",
                        str(error.value))
    assert not os.path.exists(tfds.builder("mnist", data_dir=str(tmp_path)).data_dir)


def tiny_text_model():
    inputs = keras.Input((1,), dtype="string")
    hashed = keras.layers.Hashing(8, output_mode="one_hot")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax",
                                                  name="predictions")(hashed), name="tiny_text")


def bad_predict_inputs():
    """{case: (model factory, x, labels for fine_tune's check)}: what fine_tune refuses."""
    x, y = arrays(8)
    nan_x = x.copy()
    nan_x[5, 1, 2, 0] = np.nan
    return {
        "NaN pixel": (tiny_model, nan_x),
        "wrong channel count (cannot be resized)": (tiny_model, x[..., :1]),
        "text into an image model": (tiny_model, np.array(["a good film", "a bad one"])),
        "images into a text model": (tiny_text_model, x),
    }


@pytest.mark.parametrize("case", list(bad_predict_inputs()))
def test_predict_refuses_what_fine_tune_refuses_with_the_same_line(case):
    make, x = bad_predict_inputs()[case]
    model = make()
    with pytest.raises(ValueError) as fit_error:
        tlkeras.validation.check_model_data(model, (x, np.zeros(len(x), "int32")))
    with pytest.raises(ValueError) as predict_error:
        tlkeras.predict(model, x)
    expected = str(fit_error.value).replace("train_data: ", "inputs: ", 1)
    if make is tiny_text_model:  # fine_tune shows its batches' shape, predict the array's
        expected = expected.replace("(None, 16, 16, 3)", f"{x.shape}")
    assert str(predict_error.value) == expected
    assert "\n" not in str(predict_error.value)
    if case == "text into an image model":  # a list of strings that name no file: text too
        with pytest.raises(ValueError, match="^inputs: .* received text"):
            tlkeras.predict(model, list(x))
