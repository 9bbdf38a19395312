"""Class-incremental learning: `tlkeras.add_classes` against naive fine-tuning and joint training.

Splits of real data into class steps (Fashion-MNIST 5+5 and 2+2+2+2+2, scikit-learn digits
2+2+2+2+2). After each step every method is scored on the test images of all classes seen so
far: old-class, new-class and all-class accuracy. Methods: `naive`, `lwf`, `rehearsal`,
`rehearsal+lwf` (each one `tlkeras.add_classes` call per step, memory 20 images per class) and
`joint` (the plain way, the upper bound: a fresh head trained on every image of every class seen
so far, which class-incremental learning cannot have).

Base: the demo's small CNN (`tlkeras.demo.small_cnn`, 16x16 RGB), pretrained on the *other*
data set (digits 0-4 for the Fashion-MNIST splits, Fashion-MNIST for the digits split), so no
test image was seen in pretraining. The base is frozen in `add_classes`, so the bench computes
its features once and hands `add_classes` a transfer model whose base is the identity on those
features (each exemplar is then one image's features: the same selection and training as on
images, without recomputing the CNN every call).

    python bench/bench_continual.py            # all splits (about 5-10 min on 2 loaded cores)
    python bench/bench_continual.py --quick    # Fashion-MNIST 5+5 only, fewer images
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tlkeras  # noqa: E402
from bench._common import FASHION_DIR, machine, read_idx  # noqa: E402
from tlkeras import continual, demo  # noqa: E402

METHODS = ("naive", "lwf", "rehearsal", "rehearsal+lwf")
SIZE = demo.IMAGE_SIZE


def fashion(split, per_class):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz")).astype("int32")
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    x = tf.image.resize(x[keep, ..., None].astype("float32"), (SIZE, SIZE)).numpy()
    return np.repeat(np.clip(np.rint(x), 0, 255).astype("uint8"), 3, axis=-1), y[keep]


def digits():
    """demo.load_digits_rgb split in halves per class: (train, test)."""
    x, y = demo.load_digits_rgb()
    rng = np.random.default_rng(0)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: np.sum(y == c) // 2]
                           for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), test)
    return (x[train], y[train]), (x[test], y[test])


def pretrain(x, y, epochs):
    """The demo's CNN trained (with shifts and rotations) on (x, y); returns the body."""
    keras.utils.set_random_seed(0)
    body = demo.small_cnn()
    L = keras.layers
    model = demo._compile(keras.Sequential([keras.Input((SIZE, SIZE, 3)),
                                            L.RandomTranslation(0.125, 0.125),
                                            L.RandomRotation(0.06),
                                            demo._with_head(body, int(y.max()) + 1)]))
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return body


def feature_model(dim, num_classes):
    """A tlkeras transfer model on cached features: the base is the identity."""
    base = keras.Sequential([keras.Input((dim,)), keras.layers.Identity()], name="cached_base")
    return tlkeras.build_transfer_model(base, num_classes, dropout=0.0)


def train_head(model, x, y, args):
    _, head = tlkeras.split_model(model)
    head.compile(keras.optimizers.Adam(args.learning_rate), "sparse_categorical_crossentropy",
                 steps_per_execution=32)  # as add_classes
    head.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
    return model


def scores(model, x, y, steps):
    seen = np.isin(y, sum(steps, []))
    predicted = np.argmax(model.predict(x[seen], batch_size=512, verbose=0), -1)
    return continual.step_accuracies(y[seen], predicted, steps)


def run_split(name, train, test, steps, args):
    """One class-incremental run of every method; returns rows of figures."""
    (x, y), (xt, yt) = train, test
    rows, models = [], {}
    first = np.isin(y, steps[0])
    keras.utils.set_random_seed(0)
    start = train_head(feature_model(x.shape[1], len(steps[0])), x[first], y[first], args)
    for method in METHODS:
        models[method] = start
    memory = {m: None for m in METHODS if m.startswith("rehearsal")}
    seen = [steps[0]]
    base_acc = scores(start, xt, yt, seen)["all_class_accuracy"]
    print(f"\n{name}: step 1 classes {steps[0]} all-class accuracy {base_acc:.4f}", flush=True)
    for k, new in enumerate(steps[1:], start=2):
        seen.append(new)
        is_new = np.isin(y, new)
        labels = np.searchsorted(new, y[is_new])  # add_classes labels index the new classes
        old_mask = np.isin(y, sum(seen[:-1], []))
        for method in METHODS:
            t = time.time()
            result = tlkeras.add_classes(
                models[method], (x[is_new], labels), new_class_names=[str(c) for c in new],
                class_names=[str(c) for c in sum(seen[:-1], [])], method=method,
                old_data=(x[old_mask], y[old_mask]) if method in memory and k == 2 else None,
                memory=memory.get(method), memory_per_class=args.memory, epochs=args.epochs,
                learning_rate=args.learning_rate, batch_size=args.batch_size, seed=0, verbose=0)
            models[method] = result.model
            if method in memory:
                memory[method] = result.memory
                assert max(result.memory.counts().values()) <= args.memory
            row = {"split": name, "step": k, "method": method, **scores(result.model, xt, yt, seen),
                   "seconds": round(time.time() - t, 1)}
            rows.append(row)
        t = time.time()
        keras.utils.set_random_seed(0)
        every = np.isin(y, sum(seen, []))
        joint = train_head(feature_model(x.shape[1], sum(map(len, seen))), x[every], y[every],
                           args)
        rows.append({"split": name, "step": k, "method": "joint", **scores(joint, xt, yt, seen),
                     "seconds": round(time.time() - t, 1)})
        for row in rows[-len(METHODS) - 1:]:
            print(f"  step {k} (+{new}) {row['method']:>14}: old {row['old_class_accuracy']:.4f} "
                  f"new {row['new_class_accuracy']:.4f} all {row['all_class_accuracy']:.4f} "
                  f"({row['seconds']} s)", flush=True)
    return rows


def cached_features(body, x):
    model = tlkeras.build_transfer_model(body, 2, pooling=None, weights=None)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(256)
    return tlkeras.extract_features(model, dataset, verbose=0).features


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--train_per_class", type=int, default=400)
    p.add_argument("--test_per_class", type=int, default=500)
    p.add_argument("--memory", type=int, default=20, help="exemplars per class")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--output", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.train_per_class, args.test_per_class = 200, 200
    print(machine(), flush=True)
    print(f"settings: {json.dumps(vars(args))}", flush=True)
    t0 = time.time()
    (xd, yd), (xdt, ydt) = digits()
    xf, yf = fashion("train", args.train_per_class)
    xft, yft = fashion("test", args.test_per_class)
    digits_base = pretrain(*[a[yd < 5] for a in (xd, yd)], epochs=15)  # the demo's source task
    fashion_base = pretrain(xf, yf, epochs=8)
    f_train, f_test = cached_features(digits_base, xf), cached_features(digits_base, xft)
    d_train, d_test = cached_features(fashion_base, xd), cached_features(fashion_base, xdt)
    print(f"pretraining and features: {time.time() - t0:.1f} s; Fashion-MNIST {len(yf)} train / "
          f"{len(yft)} test, digits {len(yd)} / {len(ydt)}, {f_train.shape[1]} features",
          flush=True)
    splits = [("fashion-mnist 5+5", (f_train, yf), (f_test, yft), [[0, 1, 2, 3, 4],
                                                                    [5, 6, 7, 8, 9]])]
    if not args.quick:
        pairs = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
        splits += [("fashion-mnist 2+2+2+2+2", (f_train, yf), (f_test, yft), pairs),
                   ("digits 2+2+2+2+2", (d_train, yd), (d_test, ydt), pairs)]
    rows = []
    for name, train, test, steps in splits:
        rows += run_split(name, train, test, steps, args)
    print("\nFinal step, all-class accuracy (gap to joint, points):")
    for name, *_ in splits:
        last = [r for r in rows if r["split"] == name and r["step"] == max(
            r2["step"] for r2 in rows if r2["split"] == name)]
        joint = next(r["all_class_accuracy"] for r in last if r["method"] == "joint")
        for r in last:
            print(f"  {name:<24} {r['method']:>14}: {r['all_class_accuracy']:.4f} "
                  f"({100 * (r['all_class_accuracy'] - joint):+.1f})")
    print(f"total {time.time() - t0:.1f} s; load average now "
          + " ".join(f"{v:.1f}" for v in os.getloadavg()))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
