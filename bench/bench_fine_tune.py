"""fine_tune vs the Keras transfer-learning guide, on Fashion-MNIST with real Xception weights.

Part "recipes": the guide's recipe (freeze, train the head, unfreeze the whole base, Adam 1e-5)
as published and with every BatchNormalization kept frozen by hand (on Keras 3 `fit` overrides
the guide's `base(x, training=False)` once the base is unfrozen, keras-team/keras#20285), vs
`tlkeras.fine_tune` with several options, all for the same epochs: test accuracy, wall and CPU
time. Part "cache": phase-2 time at depth 1, 2, 4 blocks with and without the cut-point cache.
Part "whole": whole fine_tune calls (cache_epochs + cache_epochs epochs), to compare code versions.

    python bench/bench_fine_tune.py [--train 500] [--test 1000] [--size 71] [--epochs 3]
        [--task fashion|digits] [--seeds 0,1,2] [--rows 2,3,4]
        [--cache_epochs 5] [--parts recipes,cache,whole] [--depths 1,2,4]
"""

import argparse
import ast
import contextlib
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tlkeras  # noqa: E402
from recipes.fashion_mnist import load  # noqa: E402

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "shared", "weights", "xception_imagenet_notop.weights.h5")


def data(n_train, n_test, size, batch_size=32, task="fashion", seed=0):
    """`(train, test)` datasets: `n_train // 10` images per class drawn with `seed`."""
    if task == "digits":  # scikit-learn's 8x8 digits, upscaled: a second, unrelated task
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.clip(tf.image.resize(digits.images[..., None] * 16.0, (28, 28)).numpy(), 0, 255)
        x, y = x[..., 0].astype("uint8"), digits.target.astype("int32")
        rng = np.random.default_rng(seed)
        idx = np.concatenate([rng.choice(np.flatnonzero(y == c), n_train // 10, replace=False)
                              for c in range(10)])
        rest = np.setdiff1d(np.arange(len(y)), idx)[:n_test]
        (x, y), (xt, yt) = (x, y), (x[rest], y[rest])
    else:
        x, y = load("train")
        rng = np.random.default_rng(seed)
        idx = np.concatenate([rng.choice(np.flatnonzero(y == c), n_train // 10, replace=False)
                              for c in range(10)])
        xt, yt = load("test", n_test)
    rgb = lambda a: np.repeat(a[..., None], 3, -1)  # noqa: E731
    train = tlkeras.data.from_arrays(rgb(x[idx]), y[idx], image_size=(size, size),
                                     batch_size=batch_size, seed=seed)
    test = tlkeras.data.from_arrays(rgb(xt), yt, image_size=(size, size), batch_size=64,
                                    shuffle=False)
    return train, test


def guide(train, test, size, epochs, bn_frozen):
    """The Keras guide's recipe, as published but for the input size and the weights file.

    `(train seconds wall, CPU)` exclude the two test evaluations."""
    base = keras.applications.Xception(weights=WEIGHTS, input_shape=(size, size, 3),
                                       include_top=False)
    base.trainable = False
    augment = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                keras.layers.RandomRotation(0.1)])
    inputs = keras.Input((size, size, 3))
    x = augment(inputs)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    clock = Clock()
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, epochs=epochs, verbose=0)
    with clock.paused():
        head = _acc(model, test)
    base.trainable = True
    if bn_frozen:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    model.compile(keras.optimizers.Adam(1e-5), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(train, epochs=epochs, verbose=0)
    return model, head, clock.stop()


class Clock:
    """Wall and CPU seconds since creation, less the time spent in `paused()` blocks."""

    def __init__(self):
        self.wall, self.cpu = time.time(), time.process_time()

    @contextlib.contextmanager
    def paused(self):
        wall, cpu = time.time(), time.process_time()
        yield
        self.wall += time.time() - wall
        self.cpu += time.process_time() - cpu

    def stop(self):
        return time.time() - self.wall, time.process_time() - self.cpu


class HeadAccuracy(keras.callbacks.Callback):
    """Test accuracy of `model` when fine_tune's phase 1 ends (not timed)."""

    def __init__(self, model, test, clock):
        super().__init__()
        self.full, self.test, self.clock, self.value = model, test, clock, None

    def on_train_end(self, logs=None):
        if self.value is None:
            with self.clock.paused():
                self.value = _acc(self.full, self.test)


def kit(train, test, size, epochs, head_acc=False, augmentation=None, seed=0, **options):
    model = tlkeras.build_transfer_model("Xception", 10, input_shape=(size, size, 3),
                                         weights=WEIGHTS, augmentation=augmentation)
    clock = Clock()
    head = HeadAccuracy(model, test, clock) if head_acc else None
    tlkeras.fine_tune(model, train, head_epochs=epochs, fine_tune_epochs=epochs, seed=seed,
                      verbose=0, callbacks=[head] if head else (), **options)
    return model, head and head.value, clock.stop()


def _acc(model, test):
    """Test accuracy; `model.predict` over the whole set (one traced function per model)."""
    probs = model.predict(test.map(lambda x, y: x), verbose=0)
    labels = np.concatenate([y.numpy() for _, y in test])
    return float(np.mean(np.argmax(probs, -1) == labels))


class EpochTimes(keras.callbacks.Callback):
    """Wall (`times`) and CPU (`cpu`) seconds of each epoch."""

    def on_train_begin(self, logs=None):
        self.times, self.cpu = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.time(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.time() - self.start[0])
        self.cpu.append(time.process_time() - self.start[1])


def loadavg():
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def recipes(train, test, size, epochs, only=None, seed=0, extra=()):
    rows = [
        ("Keras guide as published", lambda: guide(train, test, size, epochs, False)),
        ("Keras guide, BatchNorm frozen by hand", lambda: guide(train, test, size, epochs, True)),
    ]
    for name, options in [
        ("fine_tune unfreeze='all', lr head/20", dict(unfreeze="all", head_acc=True,
                                                     fine_tune_learning_rate=5e-5)),
        ("fine_tune unfreeze=2 (cut-point cache)", dict(unfreeze=2, head_acc=True,
                                                        fine_tune_learning_rate=5e-5)),
        ("  + layer_decay=0.7", dict(unfreeze=2, layer_decay=0.7)),
        ("  + gradual_unfreeze=1", dict(unfreeze=2, gradual_unfreeze=1)),
        ("  + ema=True", dict(unfreeze=2, ema=True)),
        ("  + augmentation='medium' (no caches)", dict(unfreeze=2, augmentation="medium")),
        ("  + mix='mixup' (no cut-point cache)", dict(unfreeze=2, mix="mixup")),
        ("fine_tune unfreeze=3 (cut-point cache)", dict(unfreeze=3)),
        ("fine_tune unfreeze=4 (cut-point cache)", dict(unfreeze=4)),
        ("fine_tune defaults (unfreeze=2, lr head/5)", dict(head_acc=True)),
        *[(f"fine_tune {' '.join(k)}", _options(k)) for k in extra],
    ]:
        rows.append((name, lambda o=options: kit(train, test, size, epochs, seed=seed, **o)))
    if only:  # 1-based row numbers
        rows = [row for number, row in enumerate(rows, 1) if number in only]
    print(f"{'recipe':<46} {'head acc':>8} {'test acc':>8} {'wall s':>7} {'cpu s':>7}  load")
    for name, fn in rows:
        keras.utils.set_random_seed(seed)
        try:
            model, head, (wall, cpu) = fn()
            acc = _acc(model, test)
        except Exception as error:  # one failing row must not lose the others' figures
            print(f"{name:<46} failed: {type(error).__name__}: {error}", flush=True)
            continue
        head = f"{head:.3f}" if head is not None else "-"
        print(f"{name:<46} {head:>8} {acc:>8.3f} {wall:>7.1f} {cpu:>7.1f}  ({loadavg()})",
              flush=True)
        if "(cut-point cache)" in name:  # the same model, evaluated with test-time augmentation
            try:
                tta = _acc(tlkeras.tta.tta_model(model), test)
            except Exception as error:
                print(f"tta failed: {type(error).__name__}: {error}", flush=True)
                continue
            print(f"{'  + tta=True at evaluation (same model)':<46} {'-':>8} {tta:>8.3f} "
                  f"{wall:>7.1f} {cpu:>7.1f}  ({loadavg()})", flush=True)


def _options(words):
    """`["unfreeze=2", "fine_tune_learning_rate=1e-4"]` -> fine_tune keyword arguments."""
    return {k: ast.literal_eval(v) for k, v in (w.split("=", 1) for w in words)}


def cache(train, size, epochs, depths=(1, 2, 4)):
    print(f"\nphase 2 only ({epochs} epochs, head_epochs=0): wall / CPU seconds of the fine_tune "
          "call (the cache build included); mean wall seconds of epochs 2.. (epoch 1 traces)")
    print(f"{'depth':>5} {'recompute total':>16} {'cached total':>14} {'speed-up':>8}   "
          f"{'recompute/epoch':>15} {'cached/epoch':>12} {'speed-up':>8}   CPU s/epoch")
    for depth in depths:
        totals, per_epoch, cpu_epoch = [], [], []
        for use in (False, True):
            keras.utils.set_random_seed(0)
            model = tlkeras.build_transfer_model("Xception", 10, input_shape=(size, size, 3),
                                                 weights=WEIGHTS)
            times = EpochTimes()
            clock = Clock()
            tlkeras.fine_tune(model, train, head_epochs=0, fine_tune_epochs=epochs,
                              unfreeze=depth, cache_activations=use, callbacks=[times],
                              verbose=0)
            totals.append(clock.stop())
            per_epoch.append(float(np.mean(times.times[1:] or times.times)))
            cpu_epoch.append(float(np.mean(times.cpu[1:] or times.cpu)))
        print(f"{depth:>5} {totals[0][0]:>7.1f} / {totals[0][1]:>6.1f} {totals[1][0]:>6.1f} / "
              f"{totals[1][1]:>5.1f} {totals[0][0] / totals[1][0]:>7.2f}x   "
              f"{per_epoch[0]:>15.2f} {per_epoch[1]:>12.2f} {per_epoch[0] / per_epoch[1]:>7.2f}x"
              f"   {cpu_epoch[0]:.2f} / {cpu_epoch[1]:.2f} = {cpu_epoch[0] / cpu_epoch[1]:.2f}x"
              f"  (load {loadavg()})", flush=True)


def whole(train, size, epochs, depths):
    """Whole `fine_tune` calls (phase 1 + phase 2, default caches): wall / CPU seconds.

    Run it with this commit's tlkeras and an older one to compare code versions."""
    print(f"\nwhole fine_tune call ({epochs} + {epochs} epochs, default caches), tlkeras from "
          f"{os.path.dirname(tlkeras.__file__)}")
    for depth in depths:
        keras.utils.set_random_seed(0)
        model = tlkeras.build_transfer_model("Xception", 10, input_shape=(size, size, 3),
                                             weights=WEIGHTS)
        clock = Clock()
        result = tlkeras.fine_tune(model, train, head_epochs=epochs, fine_tune_epochs=epochs,
                                   unfreeze=depth, seed=0, verbose=0)
        wall, cpu = clock.stop()
        loss = result.history["loss"]
        print(f"depth {depth}: {wall:.1f} s wall / {cpu:.1f} s CPU; training loss after phase 1 "
              f"{loss[epochs - 1]:.5f}, after phase 2 {loss[-1]:.5f}  (load {loadavg()})",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=71)
    parser.add_argument("--epochs", type=int, default=3, help="per phase (recipes)")
    parser.add_argument("--cache_epochs", type=int, default=5, help="phase 2 epochs (cache)")
    parser.add_argument("--parts", default="recipes,cache")
    parser.add_argument("--depths", default="1,2,4", help="unfreeze depths (cache)")
    parser.add_argument("--rows", default="", help="recipes rows to run, e.g. 1,2,3,4 (all)")
    parser.add_argument("--task", default="fashion", choices=["fashion", "digits"])
    parser.add_argument("--seeds", default="0", help="recipes: one run per seed (data and model)")
    parser.add_argument("--kit", action="append", default=[], help="recipes: one more fine_tune "
                        "row with these options (rows 13..), e.g. 'unfreeze=2 layer_decay=0.7'")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    tf.get_logger().setLevel("ERROR")
    print(machine())
    print("TF_ENABLE_ONEDNN_OPTS=" + os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset)"))
    print(f"{'Fashion-MNIST' if args.task == 'fashion' else 'scikit-learn digits'}: "
          f"{args.train} train images, {args.test} test, {args.size}x{args.size} "
          f"RGB; Xception ImageNet weights; recipes {args.epochs} + {args.epochs} epochs, cache "
          f"{args.cache_epochs} phase-2 epochs\n")
    train, test = data(args.train, args.test, args.size, task=args.task)
    if "recipes" in args.parts:
        for seed in [int(s) for s in args.seeds.split(",")]:
            if seed:
                print(f"\nseed {seed}")
                train, test = data(args.train, args.test, args.size, task=args.task, seed=seed)
            recipes(train, test, args.size, args.epochs,
                    [int(r) for r in args.rows.split(",") if r], seed,
                    [k.split() for k in args.kit])
    depths = [int(d) for d in args.depths.split(",")]
    if "cache" in args.parts:
        cache(train, args.size, args.cache_epochs, depths)
    if "whole" in args.parts:
        whole(train, args.size, args.cache_epochs, depths)
    print(f"\nload average at the end: {loadavg()}")


if __name__ == "__main__":
    main()
