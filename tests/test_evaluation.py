"""tlkeras.evaluate: numbers equal scikit-learn's on the same predictions; valid PNGs."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn import metrics as skm

from tlkeras.evaluation import evaluate

N = 120


def dense_model(units, activation, seed=0):
    """image -> mean colour -> "predictions", with weights giving varied outputs."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    dense = keras.layers.Dense(units, activation=activation, name="predictions")
    model = keras.Model(inputs, dense(x))
    kernel = rng.normal(0, 8, (3, units)).astype("float32")
    dense.set_weights([kernel, -0.5 * kernel.sum(axis=0)])
    return model


def images(seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (N, 4, 4, 3)).astype("float32")


def sampled_labels(probabilities, seed=2):
    """Labels drawn from the model's own probabilities: mostly right, some confident mistakes."""
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(len(p), p=p / p.sum()) for p in probabilities])


def check_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= 300 and image.size[1] >= 200
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # not blank


def test_multiclass_matches_sklearn_and_writes_files(tmp_path):
    model = dense_model(5, "softmax")
    x = images()
    probabilities = model.predict(x, verbose=0)
    y = sampled_labels(probabilities)
    predicted = probabilities.argmax(axis=1)
    names = ["ant", "bee", "cat", "dog", "eel"]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    history = {"loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.8, 0.7], "accuracy": [0.4, 0.6, 0.8]}

    report = evaluate(
        model, data, names, top_k=2, output_dir=tmp_path, history=history, num_mistakes=7
    )

    assert report.task == "multiclass" and report.num_samples == N
    assert report.metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert report.metrics["top_2_accuracy"] == pytest.approx(
        skm.top_k_accuracy_score(y, probabilities, k=2, labels=range(5))
    )
    assert report.confusion_matrix == skm.confusion_matrix(y, predicted, labels=range(5)).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, predicted, labels=range(5), zero_division=0
    )
    for i, name in enumerate(names):
        assert report.per_class[name] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        )
    assert report.metrics["macro_f1"] == pytest.approx(skm.f1_score(y, predicted, average="macro"))
    assert report.metrics["weighted_f1"] == pytest.approx(
        skm.f1_score(y, predicted, average="weighted")
    )
    assert 0.3 < report.metrics["accuracy"] < 0.95  # the comparison above is not trivial

    wrong = np.flatnonzero(predicted != y)
    expected = wrong[np.argsort(-probabilities[wrong].max(axis=1))][:7]
    assert [m["index"] for m in report.mistakes] == expected.tolist()
    first = report.mistakes[0]
    assert (
        first["true"] == names[y[first["index"]]]
        and first["predicted"] == names[predicted[first["index"]]]
    )
    assert first["confidence"] == pytest.approx(probabilities[first["index"]].max())
    assert first["file"] is None

    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(
        json.dumps(report.to_dict())
    )
    for name in ("confusion_matrix", "training_curves"):
        assert report.files[name] == str(tmp_path / f"{name}.png")
        check_png(report.files[name])


def test_history_csv_and_keras_history(tmp_path):
    model = dense_model(3, "softmax")
    x, y = images(), np.arange(N) % 3
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    csv_path = tmp_path / "history.csv"
    history = model.fit(
        x,
        y,
        validation_split=0.25,
        epochs=2,
        verbose=0,
        callbacks=[keras.callbacks.CSVLogger(str(csv_path))],
    )
    evaluate(model, (x, y), output_dir=tmp_path / "a", history=history)
    evaluate(model, (x, y), output_dir=tmp_path / "b", history=str(csv_path))
    check_png(tmp_path / "a" / "training_curves.png")
    check_png(tmp_path / "b" / "training_curves.png")


@pytest.fixture
def image_folder(tmp_path):
    """16 PNGs per class in class folders, whose colour decides the class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["dark", "light"]):
        (tmp_path / name).mkdir()
        for i in range(16):
            pixels = rng.uniform(0, 255, (4, 4, 3)) * 0.3 + (30 if c == 0 else 150)
            Image.fromarray(pixels.astype("uint8")).save(tmp_path / name / f"{i:02d}.png")
    return tmp_path


def test_mistakes_name_files_of_an_unshuffled_dataset(image_folder):
    data = keras.utils.image_dataset_from_directory(
        image_folder, image_size=(4, 4), batch_size=8, shuffle=False
    )
    model = dense_model(2, "softmax", seed=3)
    report = evaluate(model, data, num_mistakes=100)
    assert report.mistakes, "the random model should make some mistakes"
    for mistake in report.mistakes:
        assert mistake["file"] == data.file_paths[mistake["index"]]
        assert f"/{mistake['true']}/" in mistake["file"]  # the file is in its true class folder

    shuffled = keras.utils.image_dataset_from_directory(
        image_folder, image_size=(4, 4), batch_size=8, seed=1
    )
    with pytest.warns(UserWarning, match="shuffle=False"):
        report = evaluate(model, shuffled, num_mistakes=100)
    assert report.mistakes and all(m["file"] is None for m in report.mistakes)


def test_binary_matches_sklearn():
    model = dense_model(1, "sigmoid")
    x = images()
    p = model.predict(x, verbose=0)[:, 0]
    y = sampled_labels(np.stack([1 - p, p], axis=1)).astype("float32")
    predicted = (p >= 0.5).astype(int)
    report = evaluate(model, (x, y), ["no", "yes"])
    assert report.task == "binary"
    assert report.metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert report.confusion_matrix == skm.confusion_matrix(y, predicted).tolist()
    assert report.per_class["yes"]["precision"] == pytest.approx(skm.precision_score(y, predicted))
    assert report.per_class["no"]["recall"] == pytest.approx(
        skm.recall_score(y, predicted, pos_label=0)
    )
    assert report.metrics["macro_f1"] == pytest.approx(skm.f1_score(y, predicted, average="macro"))


def test_multilabel_matches_sklearn():
    model = dense_model(4, "sigmoid")
    x = images()
    p = model.predict(x, verbose=0)
    y = (np.random.default_rng(5).uniform(size=p.shape) < p).astype("float32")
    predicted = (p >= 0.5).astype(int)
    report = evaluate(model, (x, y), ["a", "b", "c", "d"])
    assert report.task == "multilabel" and report.confusion_matrix is None
    assert report.metrics["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert report.metrics["accuracy"] == pytest.approx(1 - skm.hamming_loss(y, predicted))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, predicted, zero_division=0
    )
    assert [report.per_class[c]["f1"] for c in "abcd"] == pytest.approx(f1)
    assert [report.per_class[c]["support"] for c in "abcd"] == support.tolist()
    assert report.metrics["macro_precision"] == pytest.approx(precision.mean())


def test_regression_matches_sklearn(tmp_path):
    model = dense_model(2, None)
    x = images()
    predicted = model.predict(x, verbose=0)
    y = predicted + np.random.default_rng(6).normal(0, 1, predicted.shape)
    report = evaluate(model, (x, y), output_dir=tmp_path)
    assert report.task == "regression"
    assert report.metrics["mae"] == pytest.approx(skm.mean_absolute_error(y, predicted), rel=1e-5)
    assert report.metrics["mse"] == pytest.approx(skm.mean_squared_error(y, predicted), rel=1e-5)
    assert report.metrics["r2"] == pytest.approx(skm.r2_score(y, predicted), rel=1e-5)
    assert report.files == {"report": str(tmp_path / "report.json"),
                            "html": str(tmp_path / "report.html")}


def test_clear_errors():
    model = dense_model(3, "softmax")
    x, y = images(), np.arange(N) % 3
    with pytest.raises(
        ValueError, match="class_names has 2 names but the model's multiclass output has 3"
    ):
        evaluate(model, (x, y), ["a", "b"])
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        evaluate(model, (x, y + 1))
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, (x[:0], y[:0]))
    unnamed = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    with pytest.raises(ValueError, match="no 'predictions' layer. Pass task="):
        evaluate(unnamed, (x, y))
    assert evaluate(unnamed, (x, y), task="multiclass").num_samples == N
