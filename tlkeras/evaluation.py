"""Evaluating a trained model: metrics, confusion matrix, mistakes and plots.

Example:

>>> import keras, numpy as np, tlkeras
>>> images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
>>> labels = np.arange(8) % 2
>>> base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3)], name="tiny")
>>> model = tlkeras.build_transfer_model(base, 2)
>>> report = tlkeras.evaluate(model, (images, labels), ["cat", "dog"], output_dir="runs/tiny",
...                           history={"loss": [0.9, 0.7], "val_loss": [0.8, 0.75]})
>>> report.num_samples, sorted(report.per_class["dog"])
(8, ['f1', 'precision', 'recall', 'support'])
>>> sorted(report.files)
['confusion_matrix', 'html', 'report', 'training_curves']
>>> sorted(report.mistakes[0])  # the most confident wrong prediction
['confidence', 'file', 'index', 'predicted', 'true', 'true_probability']
"""

import dataclasses
import os
import warnings

import numpy as np

from tlkeras import atomic, validation
from tlkeras.anatomy import TASKS, infer_task
from tlkeras import report as report_module
from tlkeras.continual import step_accuracies
from tlkeras.tta import tta_model
from tlkeras.plots import (  # noqa: F401 - public here too
    figure_to_png,
    plot_confusion_matrix,
    plot_training_curves,
    save_figure,
)

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
        files: paths written into `output_dir` (`report`, `html`,
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
    class_steps=None,
    overwrite=False,
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
        output_dir: if given, writes `report.json`, `confusion_matrix.png`,
            (with `history`) `training_curves.png` and `report.html` (one
            self-contained page: metrics, tables, curves from `history` or
            `<output_dir>/history.csv`, the most confident mistakes and a few
            correct examples per class with Grad-CAM overlays) into it.
        history: a `keras.callbacks.History`, a dict of lists, or the path of
            a `history.csv` (`keras.callbacks.CSVLogger`).
        num_mistakes: how many of the most confident mistakes to list.
        class_steps: the classes added at each step of `tlkeras.add_classes`
            (default: `model.class_steps` when set); with several steps,
            `old_class_accuracy` and `new_class_accuracy` (the last step's
            classes) are reported too.
        overwrite: replace a report already in `output_dir` (default: refuse).
        tta: test-time augmentation: average each prediction with the one
            for the horizontally flipped image (`tlkeras.tta.tta_model`).

    Returns:
        An `EvaluationReport`.
    """
    task = _task(model, task)
    if output_dir is not None and not overwrite:
        atomic.refuse_overwrite(os.path.join(output_dir, "report.json"))
    validation.check_model_data(model, data, task=task, name="data", labeled=False)
    examples = report_module.Examples(task, num_mistakes) if output_dir is not None else None
    predictor = tta_model(model) if tta else model  # Grad-CAM in the report uses `model`
    y_true, y_prob = collect_predictions(
        predictor, data, on_batch=examples.add if examples is not None else None
    )
    n = len(y_true)
    if n == 0:
        raise ValueError("evaluate() received empty `data`: it yielded no samples.")
    width = y_prob.shape[-1] if y_prob.ndim > 1 else 1
    if class_names is None:
        class_names = getattr(data, "class_names", None)
    if class_names is None and task != "regression":
        class_names = ["0", "1"] if task == "binary" else [str(i) for i in range(width)]
    data_names = getattr(data, "class_names", None)
    if class_names is not None and data_names is not None and task != "regression" and (
            [str(c) for c in data_names] != [str(c) for c in class_names]):
        y_true = validation.remap_labels(y_true, data_names, class_names, task)  # by name
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
        steps = class_steps if class_steps is not None else getattr(model, "class_steps", None)
        if task == "multiclass" and steps and len(steps) > 1:
            by_step = step_accuracies(labels, y_pred, steps)
            report.metrics.update({k: by_step[k] for k in ("old_class_accuracy",
                                                           "new_class_accuracy")})
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
        report.files["html"] = os.path.join(output_dir, "report.html")
        atomic.write_json(report.files["report"], report.to_dict(), default=None)
        report_module.write_report(report, output_dir, model, examples, history)
    return report


def collect_predictions(model, data, *, max_batches=None, on_batch=None):
    """Runs `model` over `data`; returns `(labels, predictions)` arrays.

    `on_batch(images, labels, predictions)`, if given, sees every batch.
    """
    labels, predictions = [], []
    for i, (x, y) in enumerate(iterate_batches(data)):
        if max_batches is not None and i >= max_batches:
            break
        predictions.append(np.asarray(model.predict_on_batch(x), dtype="float32"))
        labels.append(y)
        if on_batch is not None:
            on_batch(x, y, predictions[-1])
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
