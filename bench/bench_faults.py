"""Bad input and faults: what each kind now gets, as a Markdown table.

Runs each case of issue 14 for real (small shapes, no training except where the case is about
training) and prints its outcome: the first line of the error, or what happened.

    python bench/bench_faults.py [WORD ...]   # WORDs: only the cases whose name holds one
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._common import machine  # noqa: E402

import keras  # noqa: E402

import tlkeras  # noqa: E402
from tlkeras import runs  # noqa: E402

SIZE = 16
ROOT = tempfile.mkdtemp(prefix="tlkeras_faults_")
os.environ["TLKERAS_CACHE_DIR"] = os.path.join(ROOT, "cache")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(num_classes=3, task="multiclass", seed=0):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255.0),
                             keras.layers.Conv2D(4, 3, activation="relu")], name="tiny_cnn")
    return tlkeras.build_transfer_model(base, num_classes, task=task)


def arrays(n=48, classes=3):
    x = np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE, 3)).astype("float32")
    return x, (np.arange(n) % classes).astype("int32")


def images(folder, counts):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(
                os.path.join(folder, name, f"{i}.png"))
    return folder


def write_csv(path, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows([["file", "label"], *rows])
    return path


def fit(model, data, **kwargs):
    return tlkeras.fine_tune(model, data, head_epochs=1, fine_tune_epochs=0, verbose=0, **kwargs)


def python(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def reexport_killed():
    out = os.path.join(ROOT, "export")
    tlkeras.export_model(tiny(), out, formats="keras", class_names=["a", "b", "c"])
    before = sorted(os.listdir(out)), open(os.path.join(out, "model.keras"), "rb").read()
    proc = python("""
        import os, signal, sys, keras, tlkeras
        from tlkeras import export
        base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3)])
        model = tlkeras.build_transfer_model(base, 3)
        export._export_saved_model = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        tlkeras.export_model(model, sys.argv[1], formats=("keras", "saved_model"))
    """, out)
    proc.wait()
    after = sorted(os.listdir(out)), open(os.path.join(out, "model.keras"), "rb").read()
    return (f"child killed by signal {-proc.returncode}; previous export "
            + ("unchanged (same files, same model.keras)" if after == before else "CHANGED"))


def resume_other_model():
    run = os.path.join(ROOT, "run")
    fit(tiny(), arrays(), log_dir=run)
    config = open(os.path.join(run, "config.json")).read()
    try:
        fit(tiny(4), arrays(classes=4), log_dir=run)
    except runs.RunFolderMismatchError as error:
        same = open(os.path.join(run, "config.json")).read() == config
        return f"{error} [config.json {'unchanged' if same else 'CHANGED'}]"
    return "resumed"


def second_process():
    folder = os.path.join(ROOT, "locked")
    owner = python("""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("runs", sys.argv[2])
        runs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runs)
        runs.RunLock(sys.argv[1]).acquire()
        print("locked", flush=True)
        time.sleep(300)
    """, folder, runs.__file__)
    owner.stdout.readline()
    try:
        fit(tiny(), arrays(), log_dir=folder)
        first = "trained"
    except runs.RunFolderInUseError as error:
        first = str(error).split(". ")[0]
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    fit(tiny(), arrays(), log_dir=folder)
    return f"{first}; after kill -9 of the owner: stale lock taken over, run completed"


def nan_loss():
    folder = os.path.join(ROOT, "nan")
    x, y = arrays()
    model = tiny()
    try:
        tlkeras.fine_tune(model, (x * 1e36, y), log_dir=folder, head_epochs=3, fine_tune_epochs=1,
                          learning_rate=10.0, cache_features=False, seed=0, verbose=0)
    except tlkeras.validation.NonFiniteLossError as error:
        finite = all(np.isfinite(w).all() for w in model.get_weights())
        saved = os.path.exists(os.path.join(folder, "model.keras"))
        return (f"{str(error).split('. ')[0]} [weights finite: {finite}, model.keras written: "
                f"{saved}]")
    return "trained to the end"


def symlink_loop():
    folder = images(os.path.join(ROOT, "loop"), {"a": 3, "b": 3})
    os.symlink("..", os.path.join(folder, "a", "loop"))
    train, val = tlkeras.data.from_directory(folder, SIZE, validation_split=0.5, subset="both",
                                             seed=0)
    paths = [os.path.realpath(p) for p in train.file_paths + val.file_paths]
    return f"{len(paths)} samples from 6 files, {len(paths) - len(set(paths))} in both splits"


def csv_case(rows, **kwargs):
    folder = images(os.path.join(ROOT, "csv"), {"img": 8})
    path = write_csv(os.path.join(folder, "l.csv"), rows, kwargs.pop("encoding", "utf-8"))
    train, val = tlkeras.data.from_csv(path, "file", "label", image_size=SIZE,
                                       validation_split=0.25, subset="both", seed=0, **kwargs)
    overlap = set(train.file_paths) & set(val.file_paths)
    return (f"{len(train.file_paths) + len(val.file_paths)} images, {len(overlap)} in both "
            f"splits, classes {train.class_names}")


ROWS = [[f"img/{i}.png", "ab"[i % 2]] for i in range(8)]


def replaced_file():
    folder = images(os.path.join(ROOT, "garbage"), {"a": 3, "b": 3})
    ds = tlkeras.data.from_directory(folder, SIZE, shuffle=False, batch_size=2)
    victim = os.path.join(folder, "a", "1.png")
    st = os.stat(victim)
    open(victim, "wb").write(b"x" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    n = sum(len(x) for x, _ in ds)
    again = tlkeras.data.from_directory(folder, SIZE)
    return (f"epoch read {n} of 6 images (the file skipped, named in a warning); rescan: "
            f"{len(again.scan_report.bad)} bad ({again.scan_report.bad[0][1]})")


def not_utf8_name():
    folder = images(os.path.join(ROOT, "utf8"), {"a": 2, "b": 2})
    os.rename(os.path.join(folder, "a", "0.png"),
              os.path.join(os.fsencode(folder), b"a", b"caf\xe9.png"))
    ds = tlkeras.data.from_directory(folder, SIZE)
    return f"{sum(len(x) for x, _ in ds)} of 4 images read, {len(ds.scan_report.bad)} skipped"


def full_disk():
    disk = os.path.join(ROOT, "disk")
    os.makedirs(disk)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk]).returncode:
        return "skipped: cannot mount a tmpfs here"
    try:
        model = tiny()
        tlkeras.export_model(model, os.path.join(disk, "export"), formats="keras")
        with open(os.path.join(disk, "filler"), "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        try:
            tlkeras.export_model(model, os.path.join(disk, "export"), formats="keras")
        except Exception as error:  # noqa: BLE001
            left = sorted(os.listdir(os.path.join(disk, "export")))
            return f"{type(error).__name__}: {error} [previous export kept: {left}]"
        return "exported"
    finally:
        subprocess.run(["umount", "-l", disk])


def read_only_cache():
    cache = os.path.join(ROOT, "ro")
    os.makedirs(cache)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", cache]).returncode:
        return "skipped: cannot mount a tmpfs here"
    os.environ["TLKERAS_CACHE_DIR"] = cache
    try:
        tlkeras.data.from_directory(images(os.path.join(ROOT, "rodata"), {"a": 2, "b": 2}), SIZE)
        return "read"
    finally:
        os.environ["TLKERAS_CACHE_DIR"] = os.path.join(ROOT, "cache")
        subprocess.run(["umount", "-l", cache])


def empty_text_class():
    folder = os.path.join(ROOT, "text")
    os.makedirs(os.path.join(folder, "neg"))
    os.makedirs(os.path.join(folder, "pos"))
    open(os.path.join(folder, "pos", "1.txt"), "w").write("good")
    tlkeras.data.from_text_directory(folder)


def evaluate_by_name():
    model = tiny()
    x, y = arrays(12, classes=2)
    data = tlkeras.data.from_arrays(x, y, class_names=["c", "a"], shuffle=False)
    out = os.path.join(ROOT, "eval")
    by_name = tlkeras.evaluate(model, data, ["a", "b", "c"], output_dir=out)
    same = by_name.confusion_matrix == tlkeras.evaluate(
        model, (x, np.array([2, 0])[y]), ["a", "b", "c"]).confusion_matrix
    try:
        tlkeras.evaluate(model, data, ["a", "b", "c"], output_dir=out)
        again = "overwritten"
    except FileExistsError as error:
        again = str(error)
    return f"labels matched by name: {same}; second report into the same folder: {again}"


def tune(space):
    x, y = arrays()
    train = tlkeras.data.from_arrays(x, y)
    tlkeras.tune(tiny(), train, train, search_space=space, directory=os.path.join(ROOT, "tune"))


x, y = arrays()
nan_x = x.copy()
nan_x[5, 1, 2, 0] = np.nan
CASES = [
    ("Data lost", "re-export killed (kill -9) mid-way", reexport_killed),
    ("Data lost", "resume a run folder with another model", resume_other_model),
    ("Silently wrong", "second process on a run folder", second_process),
    ("Silently wrong", "loss becomes NaN", nan_loss),
    ("Silently wrong", "symlink loop in an image folder", symlink_loop),
    ("Silently wrong", "CSV: the same rows twice", lambda: csv_case(ROWS + ROWS[:4])),
    ("Silently wrong", "CSV: one image with two labels",
     lambda: csv_case(ROWS + [["img/0.png", "b"]])),
    ("Silently wrong", "CSV: empty label cell",
     lambda: csv_case(ROWS[:7] + [["img/7.png", ""]])),
    ("Silently wrong", "NaN pixel", lambda: fit(tiny(), (nan_x, y))),
    ("Silently wrong", "fractional labels", lambda: fit(tiny(), (x, y + 0.5))),
    ("Silently wrong", "task='binary' with 3 classes", lambda: fit(tiny(1, "binary"), (x, y))),
    ("Silently wrong", "negative learning rate", lambda: fit(tiny(), (x, y), learning_rate=-1e-3)),
    ("Silently wrong", "tune: negative learning rate in the space",
     lambda: tune({"learning_rate": [-1e-3]})),
    ("Silently wrong", "evaluate on data with other classes, twice into one folder",
     evaluate_by_name),
    ("Silently wrong", "file replaced by same-size garbage after the scan", replaced_file),
    ("Crash", "image_size=0", lambda: tlkeras.data.from_arrays(x, y, image_size=0)),
    ("Crash", "batch_size=0", lambda: tlkeras.data.from_arrays(x, y, batch_size=0)),
    ("Crash", "one-hot labels into fine_tune",
     lambda: fit(tiny(), (x, np.eye(3, dtype="float32")[y]))),
    ("Crash", "labels out of range", lambda: fit(tiny(), (x, y + 1))),
    ("Crash", "2-class model, data of 3 classes",
     lambda: fit(tiny(2), tlkeras.data.from_arrays(x, y % 2, class_names=["a", "b", "c"]))),
    ("Crash", "model 16x16, images 8x8", lambda: fit(tiny(), (x[:, :8, :8], y))),
    ("Crash", "image model given text", lambda: fit(tiny(), (np.array(["a"] * 4), y[:4]))),
    ("Crash", "fine_tune((x, y)) tuple", lambda: "trained, loss " + ", ".join(
        f"{v:.3f}" for v in fit(tiny(), (x, y)).history["loss"])),
    ("Unclear", "PNG whose name is not UTF-8", not_utf8_name),
    ("Unclear", "CSV with a byte-order mark",
     lambda: csv_case(ROWS, encoding="utf-8-sig")),
    ("Unclear", "CSV in Latin-1", lambda: csv_case(ROWS[:7] + [["img/7.png", "café"]],
                                                    encoding="latin-1")),
    ("Unclear", "no space left on device during export", full_disk),
    ("Unclear", "read-only cache folder", read_only_cache),
    ("Unclear", "empty text class folder", empty_text_class),
    ("Unclear", "tune: unknown optimizer", lambda: tune({"optimizer": ["adamx"]})),
    ("Unclear", "from_tfds: not downloaded, no network",
     lambda: tlkeras.data.from_tfds("mnist", "train", data_dir=os.path.join(ROOT, "tfds"))),
    ("Unclear", "from_tfds: not prepared, download=False", lambda: tlkeras.data.from_tfds(
        "mnist", "train", data_dir=os.path.join(ROOT, "tfds"), download=False)),
    ("Unclear", "from_tfds: unknown dataset name",
     lambda: tlkeras.data.from_tfds("mnistt", "train", data_dir=os.path.join(ROOT, "tfds"))),
    ("Silently wrong", "predict: NaN pixel", lambda: tlkeras.predict(tiny(), nan_x)),
    ("Crash", "predict: 1-channel images", lambda: tlkeras.predict(tiny(), x[..., :1])),
    ("Crash", "predict: image model given text",
     lambda: tlkeras.predict(tiny(), np.array(["a good film", "a bad one"]))),
    ("Crash", "predict: text model given images", lambda: tlkeras.predict(text_model(), x)),
]


def text_model():
    inputs = keras.Input((1,), dtype="string")
    hashed = keras.layers.Hashing(8, output_mode="one_hot")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax",
                                                  name="predictions")(hashed), name="tiny_text")


def main():
    print(machine())
    print("\n| kind | case | what it now gets | seconds |\n| --- | --- | --- | --- |")
    only = sys.argv[1:]  # words: run only the cases whose name holds one of them
    for kind, case, run in CASES:
        if only and not any(word in case for word in only):
            continue
        start = time.perf_counter()
        try:
            outcome = run() or "accepted"
        except Exception as error:  # noqa: BLE001 - the outcome is the message
            outcome = f"{type(error).__name__}: {error}"
        outcome = " ".join(str(outcome).split()).replace("|", "\\|").replace(ROOT, "<tmp>")
        print(f"| {kind} | {case} | {outcome} | {time.perf_counter() - start:.1f} |", flush=True)
    shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
