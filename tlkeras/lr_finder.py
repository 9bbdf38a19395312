"""The learning-rate range test (Smith 2015; fastai's `lr_find`) for either fine-tuning phase.

`lr_find` trains on `train_data` while the learning rate grows exponentially
from `start_lr` to `end_lr`, records the loss of every step, stops once the
loss diverges, then puts every weight and every layer's `trainable` flag back
(the model's own compiled optimizer is never touched: the sweep trains a
twin model sharing its layers, with its own optimizer).

Suggestion rule: **minimum / 10** — a tenth of the learning rate at which
the smoothed loss (exponential moving average, bias-corrected) is lowest
(fastai's "minimum" rule; more robust on short, noisy sweeps than the
steepest slope).

Example:

>>> import numpy as np, tlkeras
>>> model = tlkeras.build_transfer_model("MobileNetV2", num_classes=2,
...                                      input_shape=(32, 32, 3), weights=None)
>>> x = np.random.randint(0, 255, (64, 32, 32, 3)).astype("uint8")
>>> y = np.random.randint(0, 2, 64)
>>> data = tlkeras.data.from_arrays(x, y, batch_size=16)
>>> result = tlkeras.lr_find(model, data, steps=20)
>>> 1e-7 <= result.suggestion <= 10
True
"""

import dataclasses
import math
import os

import keras
import numpy as np

from tlkeras import models, phases
from tlkeras.phases import loss_and_metrics, make_optimizer
from tlkeras.plots import _figure, save_figure

__all__ = ["LRFindResult", "lr_find"]


@dataclasses.dataclass
class LRFindResult:
    """What `lr_find` measured: one learning rate and loss per step, and the suggestion."""

    learning_rates: list
    losses: list
    suggestion: float
    rule: str = "a tenth of the learning rate at the minimum of the smoothed loss"
    plot_path: str | None = None
    log_dir: str | None = None


def lr_find(model, train_data, *, phase="head", unfreeze=phases.UNFREEZE, unfreeze_unit="blocks",
            optimizer="adam", start_lr=1e-7, end_lr=10.0, steps=100, label_smoothing=0.0,
            log_dir=None, verbose=0):
    """Sweeps the learning rate exponentially over `steps` steps; returns an `LRFindResult`.

    Args:
        model: a `tlkeras.build_transfer_model` model; restored afterwards.
        train_data: a `tf.data.Dataset` of `(images, labels)` batches (repeated
            if shorter than `steps`).
        phase: `"head"` (base frozen, as in phase 1) or `"fine_tune"` (the top
            `unfreeze` `unfreeze_unit`s of the base trainable, as in phase 2).
        optimizer: as in `tlkeras.fine_tune`.
        start_lr, end_lr, steps: the sweep; it stops early when the smoothed
            loss exceeds 4x its minimum or is not finite.
        log_dir: if given, writes `lr_find_<phase>.png` (loss against learning
            rate, suggestion marked) and TensorBoard scalars `lr_find/<phase>/loss`
            (step: the sweep step; `lr_find/<phase>/learning_rate` beside it).
        verbose: print the suggestion.
    """
    if phase not in ("head", "fine_tune"):
        raise ValueError(f"Expected phase in ('head', 'fine_tune'), received phase={phase!r}.")
    if not (0 < start_lr < end_lr) or not isinstance(steps, int) or steps < 5:
        raise ValueError("Expected 0 < start_lr < end_lr and an int steps >= 5, received "
                         f"start_lr={start_lr!r}, end_lr={end_lr!r}, steps={steps!r}.")
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    trainable = [layer.trainable for layer in layers]
    weights = [np.array(v) for v in model.weights]
    twin = keras.Model(model.inputs, model.outputs, name=f"{model.name}_lr_find")
    rates, losses = [], []
    try:
        models.freeze(model)
        if phase == "fine_tune":
            models.unfreeze(model, unfreeze, unfreeze_unit)
        sweep_optimizer = make_optimizer(optimizer, start_lr)
        loss, _ = loss_and_metrics(models.infer_task(model), label_smoothing)
        twin.compile(optimizer=sweep_optimizer, loss=loss)
        batches = iter(train_data.repeat())
        smoothed, best = 0.0, math.inf
        for step in range(steps):
            rate = start_lr * (end_lr / start_lr) ** (step / (steps - 1))
            sweep_optimizer.learning_rate = rate
            x, y, *_ = next(batches)
            value = float(twin.train_on_batch(x, y, return_dict=True)["loss"])
            twin.reset_metrics()
            rates.append(rate)
            losses.append(value)
            smoothed = 0.98 * smoothed + 0.02 * value
            debiased = smoothed / (1 - 0.98 ** (step + 1))
            best = min(best, debiased)
            if not math.isfinite(value) or (step > 5 and debiased > 4 * best):
                break
    finally:
        for layer, flag in zip(layers, trainable):
            layer.trainable = flag
        for variable, value in zip(model.weights, weights):
            variable.assign(value)
    result = LRFindResult(rates, losses, _suggest(rates, losses), log_dir=log_dir)
    if log_dir:
        result.plot_path = _write(result, log_dir, phase)
    if verbose:
        print(f"lr_find ({phase}): suggestion {result.suggestion:.2e} ({result.rule}), "
              f"{len(rates)} steps")
    return result


def _smooth(losses, beta=0.98):
    out, average = [], 0.0
    for i, value in enumerate(losses):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** (i + 1)))
    return np.asarray(out)


def _suggest(rates, losses):
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if len(finite) < 3:
        raise ValueError("lr_find: the loss was not finite from the first steps on; "
                         "lower start_lr.")
    rates = np.asarray(rates)[finite]
    smooth = _smooth(np.asarray(losses)[finite])
    return float(max(rates[int(np.argmin(smooth))] / 10, rates[0]))


def _write(result, log_dir, phase):
    import tensorflow as tf

    os.makedirs(log_dir, exist_ok=True)
    figure = _figure(6, 4)
    ax = figure.add_subplot()
    ax.plot(result.learning_rates, result.losses, alpha=0.3, label="loss")
    ax.plot(result.learning_rates, _smooth(result.losses), label="smoothed")
    ax.axvline(result.suggestion, color="red", linestyle="--",
               label=f"suggestion {result.suggestion:.1e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title=f"lr_find ({phase})")
    ax.legend()
    path = os.path.join(log_dir, f"lr_find_{phase}.png")
    save_figure(figure, path)
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "lr_find"))
    with writer.as_default():
        for step, (rate, loss) in enumerate(zip(result.learning_rates, result.losses)):
            tf.summary.scalar(f"lr_find/{phase}/loss", loss, step=step)
            tf.summary.scalar(f"lr_find/{phase}/learning_rate", rate, step=step)
    writer.close()
    return path
