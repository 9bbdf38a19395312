"""Figures of a run: confusion matrix and training curves, as matplotlib figures or PNG bytes.

Shared by `tlkeras.evaluation`, `tlkeras.report` and the TensorBoard callbacks.
"""

import csv
import io
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["figure_to_png", "history_dict", "plot_confusion_matrix", "plot_training_curves",
           "save_figure"]


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
    history = history_dict(history)
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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _figure(width, height):
    # A pyplot-free figure: safe in threads and does not touch the user's backend.
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def history_dict(history):
    """A dict of lists from a keras `History`, a dict, or a `history.csv` path."""
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
