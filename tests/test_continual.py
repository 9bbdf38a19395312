"""tlkeras.continual: adding classes to a trained model without forgetting the old ones.

One small real task (scikit-learn digits at 16x16 on a small frozen CNN): a run trained on
digits 0-3, then digits 4-6 added by the API and digits 7-9 by the CLI.
"""

import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

import tlkeras
from tests.conftest import digits_rgb
from tlkeras import cli, continual
from tlkeras.demo import small_cnn

SIZE = 16
OLD, MID, LAST = (0, 1, 2, 3), (4, 5, 6), (7, 8, 9)


def _split(classes):
    """Train/test halves of the digits of `classes`, labels 0.. in that order."""
    x, y = digits_rgb(SIZE, classes=list(classes))
    half = len(x) // 2
    return (x[:half], y[:half]), (x[half:], y[half:])


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fine_tune run folder of a frozen small CNN + head trained on digits 0-3."""
    keras.utils.set_random_seed(0)
    folder = str(tmp_path_factory.mktemp("continual") / "run")
    model = tlkeras.build_transfer_model(small_cnn(SIZE), 4, pooling=None, dropout=0.0)
    (x, y), test = _split(OLD)
    tlkeras.fine_tune(model, tlkeras.data.from_arrays(x, y, batch_size=32, seed=0),
                      head_epochs=15, fine_tune_epochs=0, learning_rate=3e-3, log_dir=folder,
                      class_names=["zero", "one", "two", "three"], seed=0, verbose=0)
    assert _accuracy(model, *test) > 0.85
    return folder, model


def test_add_classes_three_steps_memory_and_forgetting(run, tmp_path):
    folder, model = run
    (x_old, y_old), (xt_old, yt_old) = _split(OLD)
    (x_mid, y_mid), (xt_mid, yt_mid) = _split(MID)
    old_names = ["zero", "one", "two", "three"]
    test = (np.concatenate([xt_old, xt_mid]), np.concatenate([yt_old, yt_mid + 4]))
    before = model.get_layer("predictions").get_weights()[0].copy()

    # Naive fine-tuning on the new classes forgets the old ones (on a copy: nothing written).
    naive = tlkeras.add_classes(model, (x_mid, y_mid), new_class_names=["4", "5", "6"],
                                class_names=old_names, method="naive", epochs=15,
                                learning_rate=3e-3, validation_data=test, seed=0, verbose=0)
    assert naive.metrics["old_class_accuracy"] < 0.3, naive.metrics

    # Step 1, by the API on the run folder: rehearsal + LwF keeps most old-class accuracy.
    result = tlkeras.add_classes(folder, (x_mid, y_mid), new_class_names=["4", "5", "6"],
                                 old_data=(x_old, y_old), memory_per_class=10, memory_size=80,
                                 epochs=15, learning_rate=3e-3, validation_data=test, seed=0,
                                 verbose=0)
    np.testing.assert_array_equal(model.get_layer("predictions").get_weights()[0], before)
    assert result.class_names == old_names + ["4", "5", "6"]
    assert result.class_steps == [old_names, ["4", "5", "6"]]
    assert result.model.output_shape == (None, 7)
    m = result.metrics
    assert m["old_class_accuracy"] > 0.75 and m["new_class_accuracy"] > 0.75, m
    assert m["old_class_accuracy"] > naive.metrics["old_class_accuracy"] + 0.45
    predicted = np.argmax(result.model.predict(test[0], verbose=0), -1)
    assert set(predicted) == set(range(7))  # the union of old and new classes
    with open(os.path.join(folder, "labels.txt")) as f:
        assert f.read().split("\n")[:7] == result.class_names
    report = tlkeras.evaluate(result.model, test, result.class_names)
    assert report.metrics["old_class_accuracy"] == pytest.approx(m["old_class_accuracy"])

    # The memory: herding picks, within budget (80 // 7 = 11 > 10 per class), on disk.
    memory = continual.ExemplarMemory.load(os.path.join(folder, "memory"))
    assert memory.counts() == {name: 10 for name in result.class_names}
    features = tlkeras.extract_features(model, tlkeras.data.from_arrays(
        x_old, y_old, shuffle=False), verbose=0).features
    for c in range(4):
        rows = np.flatnonzero(y_old == c)
        picks = rows[continual.herding(features[rows], 10)]
        np.testing.assert_array_equal(memory.images[memory.labels == c], x_old[picks])
        unit = features[rows] / np.linalg.norm(features[rows], axis=1, keepdims=True)
        gap = np.linalg.norm(unit[continual.herding(features[rows], 10)].mean(0) - unit.mean(0))
        rng = np.random.default_rng(c)
        random_gaps = [np.linalg.norm(unit[rng.choice(len(rows), 10, replace=False)].mean(0)
                                      - unit.mean(0)) for _ in range(20)]
        assert gap < min(random_gaps)  # closer to the class mean than any random pick

    # Step 2, by the CLI: digits 7-9 from image folders; the memory comes from the run.
    new_dir = tmp_path / "new"
    (x_last, y_last), (xt_last, yt_last) = _split(LAST)
    for name, c in zip(["seven", "eight", "nine"], range(3)):
        (new_dir / name).mkdir(parents=True)
        for i in np.flatnonzero(y_last == c):
            Image.fromarray(x_last[i]).save(new_dir / name / f"{i}.png")
    assert cli.main(["add-classes", "--model", folder, "--image_dir", str(new_dir),
                     "--epochs", "15", "--learning_rate", "3e-3", "--seed", "0"]) == 0
    final = keras.saving.load_model(os.path.join(folder, "model.keras"))
    with open(os.path.join(folder, "continual.json")) as f:
        state = json.load(f)
    assert state["class_steps"] == [old_names, ["4", "5", "6"], ["eight", "nine", "seven"]]
    assert [s["method"] for s in state["steps"]] == ["rehearsal+lwf", "rehearsal+lwf"]
    memory = continual.ExemplarMemory.load(os.path.join(folder, "memory"))
    assert memory.counts() == {name: 8 for name in sum(state["class_steps"], [])}  # 80 // 10
    # Output unit 7 is "eight" (folders in sorted order); map the test labels to it.
    order = {"seven": 9, "eight": 7, "nine": 8}
    yt_last_out = np.asarray([order[["seven", "eight", "nine"][c]] for c in yt_last])
    x_all = np.concatenate([xt_old, xt_mid, xt_last])
    y_all = np.concatenate([yt_old, yt_mid + 4, yt_last_out])
    report = tlkeras.evaluate(final, (x_all, y_all), sum(state["class_steps"], []),
                              class_steps=state["class_steps"])
    assert report.metrics["accuracy"] > 0.7, report.metrics
    assert report.metrics["old_class_accuracy"] > 0.65, report.metrics
    assert report.metrics["new_class_accuracy"] > 0.65, report.metrics

    # `tlkeras evaluate` on a folder of all classes (alphabetical folders, mapped to the
    # model's output order) reports old- and new-class accuracy.
    all_dir = tmp_path / "all"
    names = sum(state["class_steps"], [])
    for c, name in enumerate(names):
        (all_dir / name).mkdir(parents=True)
        for i in np.flatnonzero(y_all == c)[:10]:
            Image.fromarray(x_all[i]).save(all_dir / name / f"{i}.png")
    assert cli.main(["evaluate", "--model", folder, "--image_dir", str(all_dir),
                     "--output_dir", str(tmp_path / "evaluation")]) == 0
    with open(tmp_path / "evaluation" / "report.json") as f:
        metrics = json.load(f)["metrics"]
    assert metrics["accuracy"] > 0.6 and metrics["old_class_accuracy"] > 0.5, metrics

    # A damaged memory is refused with one clear line naming the file.
    npz = [n for n in os.listdir(os.path.join(folder, "memory")) if n.endswith(".npz")]
    with open(os.path.join(folder, "memory", npz[0]), "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(ValueError, match="SHA-256"):
        continual.ExemplarMemory.load(os.path.join(folder, "memory"))


def test_add_classes_bad_input(run):
    folder, model = run
    (x, y), _ = _split(MID)
    with pytest.raises(ValueError, match="already in the model"):
        tlkeras.add_classes(model, (x, y), new_class_names=["one", "x", "y"],
                            class_names=["zero", "one", "two", "three"])
    with pytest.raises(ValueError, match=r"new_data labels must index"):
        tlkeras.add_classes(model, (x, y), new_class_names=["a", "b"], verbose=0)
    with pytest.raises(ValueError, match="holds none of"):
        tlkeras.add_classes(model, (x, y), new_class_names=["a", "b", "c"], verbose=0)
