"""fine_tune vs the Keras transfer-learning guide, on Fashion-MNIST with real Xception weights.

Part "recipes": the guide's recipe (freeze, train the head, unfreeze the whole base, Adam 1e-5)
as published and with every BatchNormalization kept frozen by hand (on Keras 3 `fit` overrides
the guide's `base(x, training=False)` once the base is unfrozen, keras-team/keras#20285), vs
`tlkeras.fine_tune` with several options, all for the same epochs: test accuracy, wall and CPU
time. Part "cache": phase-2 time at depth 1, 2, 4 blocks with and without the cut-point cache.

    python bench/bench_fine_tune.py [--train 500] [--test 1000] [--size 71] [--parts recipes,cache]
"""

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tlkeras  # noqa: E402
from recipes.fashion_mnist import load  # noqa: E402

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "shared", "weights", "xception_imagenet_notop.weights.h5")


def data(n_train, n_test, size, batch_size=32):
    x, y = load("train")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), n_train // 10, replace=False)
                          for c in range(10)])
    xt, yt = load("test", n_test)
    rgb = lambda a: np.repeat(a[..., None], 3, -1)  # noqa: E731
    train = tlkeras.data.from_arrays(rgb(x[idx]), y[idx], image_size=(size, size),
                                     batch_size=batch_size, seed=0)
    test = tlkeras.data.from_arrays(rgb(xt), yt, image_size=(size, size), batch_size=64,
                                    shuffle=False)
    return train, test


def guide(train, test, size, epochs, bn_frozen):
    """The Keras guide's recipe, verbatim but for the input size and the weights file."""
    base = keras.applications.Xception(weights=WEIGHTS, input_shape=(size, size, 3),
                                       include_top=False)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train, epochs=epochs, verbose=0)
    head = model.evaluate(test, verbose=0)[1]
    base.trainable = True
    if bn_frozen:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    model.compile(keras.optimizers.Adam(1e-5), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(train, epochs=epochs, verbose=0)
    return model.evaluate(test, verbose=0)[1], head


def kit(train, test, size, epochs, **options):
    model = tlkeras.build_transfer_model("Xception", 10, input_shape=(size, size, 3),
                                         weights=WEIGHTS)
    tlkeras.fine_tune(model, train, head_epochs=epochs, fine_tune_epochs=epochs, seed=0,
                      verbose=0, **options)
    return _acc(model, test), None


def _acc(model, test):
    right = total = 0
    for x, y in test:
        right += int(np.sum(np.argmax(model.predict(x, verbose=0), -1) == y.numpy()))
        total += len(y)
    return right / total


def timed(fn, *args, **kwargs):
    wall, cpu = time.time(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.time() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=71)
    parser.add_argument("--epochs", type=int, default=2, help="per phase")
    parser.add_argument("--parts", default="recipes,cache")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(machine())
    print(f"Fashion-MNIST: {args.train} train images, {args.test} test, {args.size}x{args.size} "
          f"RGB; Xception ImageNet weights; {args.epochs} + {args.epochs} epochs\n")
    train, test = data(args.train, args.test, args.size)
    if "recipes" in args.parts:
        rows = [
            ("Keras guide as published", lambda: guide(train, test, args.size, args.epochs, False)),
            ("Keras guide, BatchNorm frozen by hand",
             lambda: guide(train, test, args.size, args.epochs, True)),
        ]
        for name, options in [
            ("fine_tune unfreeze='all'", dict(unfreeze="all")),
            ("fine_tune unfreeze='all' layer_decay=0.7", dict(unfreeze="all", layer_decay=0.7)),
            ("fine_tune unfreeze=2 (cut-point cache)", dict(unfreeze=2)),
            ("fine_tune unfreeze=2 layer_decay=0.7", dict(unfreeze=2, layer_decay=0.7)),
            ("fine_tune unfreeze=2 gradual_unfreeze=1", dict(unfreeze=2, gradual_unfreeze=1)),
            ("fine_tune unfreeze=2 ema=True", dict(unfreeze=2, ema=True)),
            ("fine_tune unfreeze=2 mix='mixup' (no cache)", dict(unfreeze=2, mix="mixup")),
        ]:
            rows.append((name, lambda o=options: kit(train, test, args.size, args.epochs, **o)))
        print(f"{'recipe':<46} {'head acc':>8} {'test acc':>8} {'wall s':>7} {'cpu s':>7}")
        for name, fn in rows:
            keras.utils.set_random_seed(0)
            (acc, head), wall, cpu = timed(fn)
            head = f"{head:.3f}" if head is not None else "-"
            print(f"{name:<46} {head:>8} {acc:>8.3f} {wall:>7.1f} {cpu:>7.1f}  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    if "cache" in args.parts:
        print(f"\nphase 2 only (1 epoch, {args.train} images): wall / CPU seconds")
        print(f"{'depth':>5} {'recompute':>16} {'cut-point cache':>16} {'speed-up (wall)':>16}")
        for depth in (1, 2, 4):
            times = []
            for cache in (False, True):
                keras.utils.set_random_seed(0)
                model = tlkeras.build_transfer_model("Xception", 10, input_shape=(args.size,) * 2
                                                     + (3,), weights=WEIGHTS)
                _, wall, cpu = timed(tlkeras.fine_tune, model, train, head_epochs=0,
                                     fine_tune_epochs=1, unfreeze=depth, cache_activations=cache,
                                     verbose=0)
                times.append((wall, cpu))
            print(f"{depth:>5} {times[0][0]:>7.1f} / {times[0][1]:>6.1f} {times[1][0]:>7.1f} / "
                  f"{times[1][1]:>6.1f} {times[0][0] / times[1][0]:>15.2f}x  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
