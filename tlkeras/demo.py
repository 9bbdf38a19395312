"""The offline main job: does transfer learning beat training from scratch on few labels?

Everything runs offline on a CPU in a few minutes, on real data shipped with
scikit-learn (the 8x8 handwritten digits, randomly shifted and rotated on a
16x16 RGB canvas, see `load_digits_rgb`):

1. Source task: a small CNN (with BatchNormalization) is trained on digits 0-4
   (with more random shifts and rotations) and saved as `pretrained_base.keras`.
2. Target task: digits 5-9 with only `k` labels per class, for several label
   budgets `k`. Transfer: `tlkeras.build_transfer_model(<pretrained base>)`
   + `tlkeras.fine_tune` (head on the frozen base, then the whole base with
   learning rates decaying 0.7x per block down from the head, `layer_decay=0.7`).
   Scratch: the same network, randomly initialized and trained end to end
   with the same head.
3. Both are scored on the same held-out digits 5-9 (averaged over seeds), the
   table is printed and saved, and every run's TensorBoard logs are written
   under the run folder: validation curves, confusion matrices and Grad-CAM
   overlays on the held-out digits (shown, never used to select anything),
   and an HParams table of method, label budget and seed.

Example:

>>> from tlkeras.demo import run_demo
>>> results = run_demo("runs/demo", quick=True)  # doctest: +SKIP
>>> results["rows"][0]  # doctest: +SKIP
{'labels_per_class': 1, 'transfer': 0.51, 'scratch': 0.39, ...}

From the command line: `tlkeras demo` (`--quick` for a one-minute version),
then `tensorboard --logdir runs/demo`.
"""

import contextlib
import csv
import json
import os
import shutil
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

import tlkeras

IMAGE_SIZE = 16
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
BUDGETS = (1, 3, 10, 30)
QUICK_BUDGETS = (1, 5)
EPOCH_SIZE = 400  # the few labeled images are repeated to this many samples per epoch
BATCH_SIZE = 16


def load_digits_rgb(seed=0):
    """scikit-learn's digits as uint8 RGB images `(N, 16, 16, 3)` and int labels.

    Each 8x8 digit is enlarged to 12x12, rotated by up to 20 degrees and placed
    at a random position of a 16x16 canvas (fixed by `seed`): the nuisance
    real images have, which a network learns to ignore from many source
    images but cannot learn from a handful of target labels.
    """
    from scipy import ndimage
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = tf.image.resize(digits.images[..., None] / 16.0, (12, 12)).numpy()[..., 0]
    rng = np.random.default_rng(seed)
    x = np.zeros((len(small), IMAGE_SIZE, IMAGE_SIZE), "float32")
    for i, image in enumerate(small):
        image = ndimage.rotate(image, rng.uniform(-20, 20), reshape=False, order=1)
        row, col = rng.integers(0, IMAGE_SIZE - 12 + 1, 2)
        x[i, row:row + 12, col:col + 12] = image
    x = np.repeat(np.clip(np.rint(x * 255), 0, 255).astype("uint8")[..., None], 3, axis=-1)
    return x, digits.target.astype("int32")


def small_cnn(size=IMAGE_SIZE, name="digits_cnn"):
    """The demo's network body: four 3x3 convolutions with BatchNormalization.

    Takes raw [0, 255] pixels (it rescales them itself), outputs a 4x4x32 map.
    """
    L = keras.layers
    layers = [keras.Input((size, size, 3)), L.Rescaling(1 / 255.0, name="rescale")]
    for i, (filters, pool) in enumerate([(16, False), (16, True), (32, False), (32, True)]):
        layers += [L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}"),
                   # momentum 0.9: moving statistics settle within the few steps small data give
                   L.BatchNormalization(momentum=0.9, name=f"bn{i}"), L.ReLU(name=f"relu{i}")]
        if pool:
            layers.append(L.MaxPooling2D(name=f"pool{i}"))
    return keras.Sequential(layers, name=name)


def _with_head(body, num_classes):
    """`body` + the head `build_transfer_model(body)` adds (average pooling, dropout, dense)."""
    L = keras.layers
    return keras.Sequential([body, L.GlobalAveragePooling2D(), L.Dropout(0.2),
                             L.Dense(num_classes, activation="softmax", name="predictions")])


def _compile(model):
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def _sample(y, k, rng):
    """Indices of `k` random samples of each class in `y`."""
    return np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                           for c in np.unique(y)])


def _repeat(a, size=EPOCH_SIZE):
    """`a` repeated to about `size` samples, so that an epoch of few labels is not one step."""
    return np.concatenate([a] * max(1, size // len(a)))


def run_demo(run_dir="runs/demo", *, quick=False, budgets=None, seeds=None, verbose=0,
             print_fn=print):
    """Runs the transfer-vs-scratch comparison; returns the results dict.

    Args:
        run_dir: the run folder (created): `pretrain/`, one folder per run
            (`transfer_k5_seed0/`, `scratch_k5_seed0/`, ... with TensorBoard
            logs under `logs/`), `summary/` (test accuracy against the label
            budget, for TensorBoard), `pretrained_base.keras`, `results.json`
            and `results.csv`.
        quick: label budgets 1 and 5 with two seeds (about a minute).
        budgets: labels per class to compare (default 1, 3, 10, 30).
        seeds: number of seeds averaged per budget (default 3; 2 with `quick`).
        verbose: Keras progress output of each fit.
        print_fn: where progress and the table go (None: silent).

    Returns:
        `{"rows": [{"labels_per_class", "transfer", "scratch", "transfer_std",
        "scratch_std", "seeds"}, ...], "source_accuracy", "run_dir", "seconds"}`.
    """
    say = print_fn or (lambda *a, **k: None)
    start = time.time()
    budgets, seeds = _plan(quick, budgets, seeds)
    _clear(run_dir)
    x, y = load_digits_rgb()
    with warnings.catch_warnings(), _tf_log_level("ERROR"):
        warnings.simplefilter("ignore", UserWarning)  # Keras' notes on tf.data inputs
        source_accuracy, base_path = _pretrain(x, y, run_dir, verbose, say)

        # 2. Target task: digits 5-9, a fixed held-out half for testing.
        target = np.flatnonzero(np.isin(y, TARGET_CLASSES))
        xt, yt = x[target], y[target] - TARGET_CLASSES[0]
        test_idx = _sample(yt, min(np.bincount(yt)) // 2, np.random.default_rng(0))
        pool = np.setdiff1d(np.arange(len(yt)), test_idx)
        test = (xt[test_idx], yt[test_idx])
        val = tlkeras.data.from_arrays(*test, batch_size=64, shuffle=False,
                                       class_names=[str(c) for c in TARGET_CLASSES])
        largest = int(min(np.bincount(yt[pool])))
        if max(budgets) > largest:
            raise ValueError(f"budgets: at most {largest} labels per class are available, "
                             f"received {max(budgets)}.")
        say(f"Target task: digits 5-9, {len(pool)} training candidates, {len(test_idx)} held out.")
        scores = {}
        for k in budgets:
            for seed in range(seeds):
                train_idx = pool[_sample(yt[pool], k, np.random.default_rng(1000 + seed))]
                xs, ys = _repeat(xt[train_idx]), _repeat(yt[train_idx])
                tag = f"k{k}_seed{seed}"
                hparams = {"labels_per_class": k, "seed": seed}
                # Confusion matrix and Grad-CAM twice a run (each costs a second or two), no grid.

                keras.utils.set_random_seed(seed)
                model = tlkeras.build_transfer_model(
                    keras.saving.load_model(base_path), num_classes=5, weights=None)
                tlkeras.fine_tune(
                    model, tlkeras.data.from_arrays(xs, ys, batch_size=BATCH_SIZE, seed=seed), val,
                    head_epochs=5, fine_tune_epochs=6, unfreeze="all", head_learning_rate=1e-2,
                    fine_tune_learning_rate=3e-3, layer_decay=0.7,
                    tensorboard={"hparams": {"method": "transfer", **hparams},
                                 "every_n_epochs": 5, "num_images": 0},
                    run_dir=os.path.join(run_dir, f"transfer_{tag}"), seed=seed, verbose=verbose)
                transfer = _accuracy(model, test)

                keras.utils.set_random_seed(seed)
                scratch_model = _compile(_with_head(small_cnn(), 5))
                scratch_model.fit(
                    xs,
                    ys,
                    batch_size=BATCH_SIZE,
                    epochs=6,
                    verbose=verbose,
                    validation_data=val,
                    callbacks=tlkeras.callbacks.tensorboard_callbacks(
                        os.path.join(run_dir, f"scratch_{tag}", "logs"), validation_data=val,
                        hparams={"method": "scratch", **hparams}, every_n_epochs=3,
                        num_images=0,
                    ),
                )
                scratch = _accuracy(scratch_model, test)
                scores.setdefault(k, []).append((transfer, scratch))
                say(f"  {k:>2} labels/class, seed {seed}: transfer {transfer:.3f}, "
                    f"scratch {scratch:.3f}")

    rows = []
    for k, pairs in scores.items():
        t, s = np.asarray(pairs).T
        rows.append(
            {
                "labels_per_class": k,
                "transfer": float(t.mean()),
                "scratch": float(s.mean()),
                "transfer_std": float(t.std()),
                "scratch_std": float(s.std()),
                "seeds": len(t),
            }
        )
    _write_results(run_dir, rows)
    results = {
        "rows": rows,
        "source_accuracy": source_accuracy,
        "run_dir": os.path.abspath(run_dir),
        "seconds": time.time() - start,
    }
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    say("")
    say(format_table(rows))
    say(f"\nDone in {results['seconds']:.0f} s. Results: {os.path.join(run_dir, 'results.csv')}")
    say(f"Open TensorBoard with:  tensorboard --logdir {run_dir}   (then http://localhost:6006)")
    return results


def _plan(quick, budgets, seeds):
    """The sorted label budgets and the number of seeds `run_demo` compares."""
    return sorted(budgets or (QUICK_BUDGETS if quick else BUDGETS)), seeds or (2 if quick else 3)


def _pretrain(x, y, run_dir, verbose, say):
    """1. Source task: digits 0-4, with more random shifts and rotations; saves the body."""
    source = np.isin(y, SOURCE_CLASSES)
    keras.utils.set_random_seed(0)
    body = small_cnn()
    L = keras.layers
    model = _compile(
        keras.Sequential(
            [
                keras.Input(body.input_shape[1:]),
                L.RandomTranslation(0.125, 0.125),
                L.RandomRotation(0.06),
                _with_head(body, len(SOURCE_CLASSES)),
            ]
        )
    )
    say(f"Source task: pretraining a small CNN on digits 0-4 ({source.sum()} images) ...")
    history = model.fit(
        x[source],
        y[source],
        batch_size=32,
        epochs=15,
        validation_split=0.15,
        verbose=verbose,
        callbacks=tlkeras.callbacks.tensorboard_callbacks(
            os.path.join(run_dir, "pretrain", "logs")
        ),
    )
    base_path = os.path.join(run_dir, "pretrained_base.keras")
    body.save(base_path)
    accuracy = float(history.history["val_accuracy"][-1])
    say(f"  validation accuracy {accuracy:.3f}; base saved to {base_path}")
    return accuracy, base_path


def _clear(run_dir):
    """Creates `run_dir`, removing what an earlier demo wrote there (fine_tune would resume it)."""
    os.makedirs(run_dir, exist_ok=True)
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(("pretrain", "transfer_", "scratch_", "summary", "results.")):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _accuracy(model, test):
    return float(np.mean(np.argmax(model.predict(test[0], verbose=0), -1) == test[1]))


@contextlib.contextmanager
def _tf_log_level(level):
    logger = tf.get_logger()
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def format_table(rows):
    """The results as a text table: test accuracy on digits 5-9 per label budget."""
    lines = ["Test accuracy on digits 5-9 (mean +- std over seeds)",
             f"{'labels/class':>12}  {'transfer':>14}  {'from scratch':>14}  {'gain':>6}"]
    for r in rows:
        lines.append(
            f"{r['labels_per_class']:>12}  {r['transfer']:>7.3f} +- {r['transfer_std']:.3f}"
            f"  {r['scratch']:>7.3f} +- {r['scratch_std']:.3f}"
            f"  {r['transfer'] - r['scratch']:>+6.3f}"
        )
    return "\n".join(lines)


def _write_results(run_dir, rows):
    with open(os.path.join(run_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for method in ("transfer", "scratch"):  # one TensorBoard run per method: accuracy vs budget
        writer = tf.summary.create_file_writer(os.path.join(run_dir, "summary", method))
        with writer.as_default():
            for r in rows:
                tf.summary.scalar("test_accuracy_vs_labels_per_class", r[method],
                                  step=r["labels_per_class"])
        writer.close()
