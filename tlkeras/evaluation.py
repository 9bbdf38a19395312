"""Evaluating a trained model: metrics, confusion matrix, mistakes and plots.

Example:

>>> report = tlkeras.evaluate(model, val_ds, output_dir="runs/flowers",
...                           history="runs/flowers/history.csv")
>>> report.metrics["accuracy"], report.per_class["roses"]["f1"]
>>> report.mistakes[0]  # the most confident wrong prediction
{'index': 17, 'file': '.../roses/123.jpg', 'true': 'roses', 'predicted': 'tulips', ...}
"""

import csv
import dataclasses
import json
import os
import warnings

import numpy as np

from tlkeras.models import TASKS, infer_task

THRESHOLD = 0.5  # decision threshold of "binary" and "multilabel" outputs


@dataclasses.dataclass
class EvaluationReport:
    """What `evaluate` measured.

    Attributes:
        task: "multiclass", "binary", "multilabel" or "regression".
        num_samples: number of evaluated samples.
        metrics: overall metrics: `accuracy`, `top_<k>_accuracy`,
            `macro_precision/recall/f1`, `weighted_f1` (classification;
            multilabel adds `subset_accuracy`), or `mae`, `mse`, `rmse`, `r2`
            (regression).
        class_names: the class (label) names.
        per_class: `{class_name: {"precision", "recall", "f1", "support"}}`.
        confusion_matrix: `[true][predicted]` counts (multiclass and binary).
        mistakes: the most confident wrong predictions, most confident first:
            dicts with `index` (position in `data`), `file` (or None),
            `true`, `predicted`, `confidence` (predicted class probability)
            and `true_probability`.
        files: paths written into `output_dir` (`report`,
            `confusion_matrix`, `training_curves`).
    """

    task: str
    num_samples: int
    metrics: dict
    class_names: list = None
    per_class: dict = None
    confusion_matrix: list = None
    mistakes: list = None
    files: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        return dataclasses.asdict(self)


def evaluate(
    model,
    data,
    class_names=None,
    *,
    task=None,
    top_k=5,
    output_dir=None,
    history=None,
    num_mistakes=10,
    tta=False,
):
    """Evaluates `model` on `data` and writes a report into `output_dir`.

    File names of mistakes come from `data.file_paths` (set by Keras'
    `image_dataset_from_directory` and `tlkeras.data`). They are only
    reported when the dataset yields the files in that order: it must not be
    shuffled (`shuffle=False`); a dataset containing a shuffle, or yielding a
    different number of samples than it has file paths, gets `file=None`.

    Args:
        model: a `keras.Model`.
        data: a `tf.data.Dataset` of `(images, labels)` batches, or a tuple
            `(images, labels)` of arrays. Labels: class ids (or one-hot) for
            "multiclass", 0/1 for "binary", multi-hot for "multilabel".
        class_names: names of the classes; defaults to `data.class_names`,
            else "0", "1", ...
        task: one of `tlkeras.models.TASKS`; read from the model's
            "predictions" layer when omitted.
        top_k: also report top-k accuracy (multiclass, when k < classes).
        output_dir: if given, writes `report.json`, `confusion_matrix.png`
            and (with `history`) `training_curves.png` into it.
        history: a `keras.callbacks.History`, a dict of lists, or the path of
            a `history.csv` (`keras.callbacks.CSVLogger`).
        num_mistakes: how many of the most confident mistakes to list.
        tta: test-time augmentation: average each prediction with the one
            for the horizontally flipped image (`tlkeras.tta.tta_model`).

    Returns:
        An `EvaluationReport`.
    """
    task = _task(model, task)
    if tta:
        from tlkeras.tta import tta_model

        model = tta_model(model)
    y_true, y_prob = collect_predictions(model, data)
    n = len(y_true)
    if n == 0:
        raise ValueError("evaluate() received empty `data`: it yielded no samples.")
    width = y_prob.shape[-1] if y_prob.ndim > 1 else 1
    if class_names is None:
        class_names = getattr(data, "class_names", None)
    if class_names is None and task != "regression":
        class_names = ["0", "1"] if task == "binary" else [str(i) for i in range(width)]
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        expected = 2 if task == "binary" else width
        if task != "regression" and len(class_names) != expected:
            raise ValueError(
                f"class_names has {len(class_names)} names but the model's {task} output "
                f"has {expected} classes: {class_names}."
            )

    report = EvaluationReport(task=task, num_samples=n, metrics={}, class_names=class_names)
    if task == "regression":
        report.metrics = _regression_metrics(y_true.reshape(n, -1), y_prob.reshape(n, -1))
    elif task == "multilabel":
        y_true = y_true.reshape(n, -1).astype(int)
        y_pred = (y_prob >= THRESHOLD).astype(int)
        report.metrics["subset_accuracy"] = float(np.mean(np.all(y_true == y_pred, axis=1)))
        report.metrics["accuracy"] = float(np.mean(y_true == y_pred))
        tp = np.sum(y_true * y_pred, axis=0)
        report.per_class, summary = _per_class(
            tp, np.sum(y_pred, axis=0), np.sum(y_true, axis=0), class_names
        )
        report.metrics.update(summary)
    else:
        if task == "binary":
            p1 = y_prob.reshape(n)
            y_prob = np.stack([1.0 - p1, p1], axis=1)
            y_pred = (p1 >= THRESHOLD).astype(int)
            labels = y_true.reshape(n)
        else:
            y_pred = np.argmax(y_prob, axis=1)
            labels = y_true if y_true.ndim == 1 else np.argmax(y_true.reshape(n, -1), axis=1)
        labels = np.rint(labels).astype(int)
        num_classes = y_prob.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"Labels must be class ids in [0, {num_classes}); found {labels.min()}.."
                f"{labels.max()}. For one-hot labels pass 2D arrays; check `task`."
            )
        cm = confusion_matrix(labels, y_pred, num_classes)
        report.confusion_matrix = cm.tolist()
        report.metrics["accuracy"] = float(np.mean(labels == y_pred))
        if task == "multiclass" and top_k and top_k < num_classes:
            top = np.argsort(-y_prob, axis=1, kind="stable")[:, :top_k]
            report.metrics[f"top_{top_k}_accuracy"] = float(
                np.mean(np.any(top == labels[:, None], axis=1))
            )
        report.per_class, summary = _per_class(
            np.diag(cm), cm.sum(axis=0), cm.sum(axis=1), class_names
        )
        report.metrics.update(summary)
        report.mistakes = _mistakes(
            labels, y_pred, y_prob, class_names, _file_paths(data, n), num_mistakes
        )

    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        if report.confusion_matrix is not None:
            path = os.path.join(output_dir, "confusion_matrix.png")
            save_figure(plot_confusion_matrix(cm, class_names), path)
            report.files["confusion_matrix"] = path
        if history is not None:
            path = os.path.join(output_dir, "training_curves.png")
            save_figure(plot_training_curves(history), path)
            report.files["training_curves"] = path
        report.files["report"] = os.path.join(output_dir, "report.json")
        with open(report.files["report"], "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return report


def collect_predictions(model, data, *, max_batches=None):
    """Runs `model` over `data`; returns `(labels, predictions)` arrays."""
    labels, predictions = [], []
    for i, (x, y) in enumerate(iterate_batches(data)):
        if max_batches is not None and i >= max_batches:
            break
        predictions.append(np.asarray(model.predict_on_batch(x), dtype="float32"))
        labels.append(y)
    if not predictions:
        return np.zeros((0,)), np.zeros((0, 0))
    return np.concatenate(labels), np.concatenate(predictions)


def first_samples(data, num):
    """The first `num` `(images, labels)` of `data`."""
    images, labels = [], []
    for x, y in iterate_batches(data):
        images.append(x)
        labels.append(y)
        if sum(map(len, images)) >= num:
            break
    return np.concatenate(images)[:num], np.concatenate(labels)[:num]


def iterate_batches(data, batch_size=32):
    """Yields `(images, labels)` numpy batches from a dataset or an `(x, y)` tuple."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if len(x) != len(y):
            raise ValueError(f"`data` images and labels differ in length: {len(x)} vs {len(y)}.")
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    if not hasattr(data, "as_numpy_iterator"):
        raise TypeError(
            "Expected `data` to be a tf.data.Dataset of (images, labels) batches or a tuple "
            f"(images, labels); received {type(data).__name__}."
        )
    for element in data.as_numpy_iterator():
        if not isinstance(element, tuple) or len(element) < 2:
            raise ValueError(
                "Expected a dataset of (images, labels) batches with labels; received elements "
                f"of type {type(element).__name__}."
            )
        yield element[0], element[1]


def confusion_matrix(labels, predictions, num_classes):
    """`[true][predicted]` counts as an int array."""
    flat = np.asarray(labels) * num_classes + np.asarray(predictions)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion_matrix(cm, class_names, title="Confusion matrix"):
    """A matplotlib `Figure` of a confusion matrix (colour: row-normalised recall)."""
    cm = np.asarray(cm)
    num = len(cm)
    size = min(4 + 0.45 * num, 24)
    figure = _figure(size, size * 0.85)
    ax = figure.add_subplot()
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set(xticks=range(num), yticks=range(num), xlabel="Predicted", ylabel="True", title=title)
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if num <= 30:
        for i in range(num):
            for j in range(num):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    return figure


def plot_training_curves(history):
    """A matplotlib `Figure` with one panel per metric (train and validation)."""
    history = _history_dict(history)
    names = [k for k in history if not k.startswith("val_") and k != "epoch"]
    names += [k[4:] for k in history if k.startswith("val_") and k[4:] not in history]
    if not names:
        raise ValueError(f"`history` holds no metrics: {list(history)}.")
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    figure = _figure(5 * cols, 3.5 * rows)
    epochs = history.get("epoch")  # CSVLogger's absolute (0-based) epochs, across phases
    for i, name in enumerate(names):
        ax = figure.add_subplot(rows, cols, i + 1)
        for key, label in ((name, "train"), ("val_" + name, "validation")):
            if key in history:
                values = np.asarray(history[key], dtype=float)
                x = (
                    np.arange(len(values))
                    if epochs is None or len(epochs) != len(values)
                    else epochs
                )
                ax.plot(np.asarray(x) + 1, values, marker=".", label=label)
        ax.set(title=name, xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    return figure


def save_figure(figure, path):
    figure.savefig(path, dpi=100)


def figure_to_png(figure):
    """Renders a matplotlib `Figure` to PNG bytes."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _figure(width, height):
    # A pyplot-free figure: safe in threads and does not touch the user's backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _task(model, task):
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"Expected task in {TASKS}, received task={task!r}.")
        return task
    try:
        return infer_task(model)
    except ValueError:
        raise ValueError(
            f"Cannot read the task of model {model.name!r}: it has no 'predictions' layer. "
            f"Pass task= one of {TASKS}."
        ) from None


def _per_class(tp, predicted, support, class_names):
    tp, predicted, support = (np.asarray(a, dtype=float) for a in (tp, predicted, support))
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
    }
    weights = support / max(support.sum(), 1)
    summary = {
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "weighted_f1": float(np.sum(f1 * weights)),
    }
    return per_class, summary


def _regression_metrics(y_true, y_pred):
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"Regression targets have shape {y_true.shape}, predictions {y_pred.shape}."
        )
    error = y_pred - y_true.astype(float)
    mse = float(np.mean(error**2))
    # R^2 per output, averaged uniformly (as sklearn's r2_score).
    total = np.sum((y_true - y_true.mean(axis=0)) ** 2, axis=0)
    r2 = 1.0 - np.sum(error**2, axis=0) / np.where(total > 0, total, np.nan)
    return {
        "mae": float(np.mean(np.abs(error))),
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "r2": float(np.nanmean(r2)) if np.any(total > 0) else float("nan"),
    }


def _mistakes(labels, predictions, probabilities, class_names, files, limit):
    wrong = np.flatnonzero(labels != predictions)
    confidence = probabilities[wrong, predictions[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:limit]
    return [
        {
            "index": int(i),
            "file": files[i] if files is not None else None,
            "true": class_names[labels[i]],
            "predicted": class_names[predictions[i]],
            "confidence": float(probabilities[i, predictions[i]]),
            "true_probability": float(probabilities[i, labels[i]]),
        }
        for i in order
    ]


def _file_paths(data, num_samples):
    paths = getattr(data, "file_paths", None)
    if paths is None:
        return None
    if len(paths) != num_samples or _is_shuffled(data):
        warnings.warn(
            "Not reporting file names of mistakes: `data` is shuffled or yields a different "
            f"number of samples ({num_samples}) than data.file_paths ({len(paths)}). Build "
            "the dataset with shuffle=False to get file names."
        )
        return None
    return [str(p) for p in paths]


def _is_shuffled(dataset):
    import tensorflow as tf

    try:
        graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    except Exception:  # not a tf.data.Dataset, or the graph is not serialisable
        return True
    ops = [node.op for node in graph.node]
    ops += [node.op for function in graph.library.function for node in function.node_def]
    return any("Shuffle" in op for op in ops)


def _history_dict(history):
    if hasattr(history, "history"):  # keras.callbacks.History
        history = history.history
    if isinstance(history, (str, os.PathLike)):
        with open(history, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"History file {history} has no rows.")
        history = {k: [float(r[k]) for r in rows if r[k] != ""] for k in rows[0]}
    if not isinstance(history, dict):
        raise TypeError(
            "Expected `history` to be a keras History, a dict of lists or a history.csv path; "
            f"received {type(history).__name__}."
        )
    return history
