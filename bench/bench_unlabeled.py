"""Learning from unlabeled target images: SimCLR pretraining, CORAL/DANN, cluster/similar.

(a) self-supervised: the demo's small CNN pretrained (supervised) on Fashion-MNIST classes 0-4
    (16x16),
    vs the same base after `tlkeras.pretrain` (SimCLR) on unlabeled images of classes 5-9; then
    the same few-label fine-tune (1, 10, 100 labels per class) on classes 5-9, scored on held-out
    images of classes 5-9 (mean over seeds).
(b) domain adaptation: labeled source = clean digits (scikit-learn, as the demo makes them),
    unlabeled target = the same digits blended onto patches of scikit-learn's sample photos
    (|photo - digit|, as MNIST-M is made). Target accuracy of source-only, CORAL, DANN and a
    target-supervised upper bound; checkpoints picked by SOURCE validation (no target label used).
(c) cluster/similar on Fashion-MNIST classes 5-9: NMI (k = 5 and chosen by silhouette) and
    recall@10 with random, pretrained and pretrained+SimCLR features.

    python bench/bench_unlabeled.py              # all parts
    python bench/bench_unlabeled.py --parts a    # one part
    python bench/bench_unlabeled.py --parts x    # (c) with ImageNet Xception (../shared/weights)
"""

import argparse
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tlkeras  # noqa: E402
from _common import FASHION_DIR, machine, read_idx  # noqa: E402
from recipes.domain_shift import blend_on_photos  # noqa: E402
from tlkeras.demo import load_digits_rgb, small_cnn  # noqa: E402

SIZE = 16  # Fashion-MNIST resized to 16x16: the loaded 2-core machine
XCEPTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                        "weights", "xception_imagenet_notop.weights.h5")
TMP = tempfile.mkdtemp(prefix="bench_unlabeled_")


def fashion():
    x = read_idx(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))[:20000]
    y = read_idx(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz"))[:20000].astype("int32")
    x = tf.image.resize(x[..., None].astype("float32"), (SIZE, SIZE)).numpy()
    return np.repeat(np.clip(np.rint(x), 0, 255).astype("uint8"), 3, axis=-1), y


def supervised_base(x, y, classes, epochs, size, seed=0):
    """A small CNN trained with plain Keras (BatchNormalization in training mode); the body."""
    keras.utils.set_random_seed(seed)
    body = small_cnn(size)
    model = keras.Sequential([body, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(classes, activation="softmax")])
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=epochs, validation_split=0.1, verbose=0)
    return body, history.history["val_accuracy"][-1]


def save(model, name):
    path = os.path.join(TMP, name)
    model.save(path)
    return path


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, batch_size=256, verbose=0).argmax(-1) == y))


def few_label_finetune(base_path, x, y, k, seed, test):
    """The demo's transfer recipe: head on the frozen base, then the whole base at a low rate."""
    rng = np.random.default_rng(1000 + seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                          for c in np.unique(y)])
    reps = max(1, 400 // len(idx))
    xs, ys = np.concatenate([x[idx]] * reps), np.concatenate([y[idx]] * reps)
    keras.utils.set_random_seed(seed)
    model = tlkeras.build_transfer_model(keras.saving.load_model(base_path), 5, weights=None)
    tlkeras.fine_tune(model, tlkeras.data.from_arrays(xs, ys, batch_size=16, seed=seed),
                      head_epochs=5, fine_tune_epochs=3, learning_rate=1e-2,
                      fine_tune_learning_rate=1e-3, seed=seed, verbose=0)
    return accuracy(model, *test)


def fashion_split():
    x, y = fashion()
    rng = np.random.default_rng(0)
    source = rng.permutation(np.flatnonzero(y < 5))[:3000]
    target = rng.permutation(np.flatnonzero(y >= 5))
    unlabeled, test = target[:2500], target[2500:3500]
    return (x[source], y[source]), (x[unlabeled], y[unlabeled] - 5), (x[test], y[test] - 5)


def part_a(args, split):
    (xs, ys), (xu, yu), test = split
    t0 = time.time()
    body, val = supervised_base(xs, ys, 5, args.source_epochs, SIZE)
    pretrained = save(body, "fashion_base.keras")
    print(f"(a) source base: Fashion-MNIST classes 0-4, {len(xs)} images, "
          f"{args.source_epochs} epochs, val accuracy {val:.4f} ({time.time() - t0:.0f} s)")
    t0 = time.time()
    adapted = keras.saving.load_model(pretrained)
    result = tlkeras.pretrain(adapted, xu, epochs=args.simclr_epochs, batch_size=128, seed=0,
                              verbose=0)
    simclr = save(adapted, "fashion_base_simclr.keras")
    loss = result.history["loss"]
    acc = result.history["contrastive_accuracy"]
    print(f"(a) tlkeras.pretrain (SimCLR) on {len(xu)} unlabeled target images, "
          f"{args.simclr_epochs} epochs: NT-Xent {loss[0]:.3f} -> {loss[-1]:.3f}, contrastive "
          f"accuracy {acc[0]:.3f} -> {acc[-1]:.3f} ({time.time() - t0:.0f} s)")
    print("| labels/class | pretrained base | + SimCLR on unlabeled target | gain |")
    print("| --- | --- | --- | --- |")
    for k in args.budgets:
        scores = {"base": [], "simclr": []}
        for seed in range(args.seeds):
            scores["base"].append(few_label_finetune(pretrained, xu, yu, k, seed, test))
            scores["simclr"].append(few_label_finetune(simclr, xu, yu, k, seed, test))
        b, s = np.mean(scores["base"]), np.mean(scores["simclr"])
        print(f"| {k} | {b:.4f} +- {np.std(scores['base']):.4f} | "
              f"{s:.4f} +- {np.std(scores['simclr']):.4f} | {s - b:+.4f} |", flush=True)
    return pretrained, simclr


def part_b(args):
    x, y = load_digits_rgb(seed=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    src, tgt = order[:900], order[900:]
    xs, ys = x[src], y[src]
    xt_all, yt_all = blend_on_photos(x[tgt], seed=1), y[tgt]
    half = len(tgt) // 2
    xt, yt, test = xt_all[:half], yt_all[:half], (xt_all[half:], yt_all[half:])
    source = tlkeras.data.from_arrays(xs[:800], ys[:800], batch_size=32, seed=0)
    source_val = tlkeras.data.from_arrays(xs[800:], ys[800:], batch_size=50, shuffle=False)
    target = tf.data.Dataset.from_tensor_slices(xt).shuffle(len(xt), seed=0).batch(32)

    t0 = time.time()
    body, val = supervised_base(xs[:800], ys[:800], 10, args.source_epochs, 16)
    model = tlkeras.build_transfer_model(body, 10, weights=None)
    tlkeras.fine_tune(model, source, source_val, head_epochs=5, fine_tune_epochs=0,
                      learning_rate=1e-2, verbose=0)
    path = save(model, "digits_source_only.keras")
    rows = {"source only": accuracy(model, *test)}
    print(f"(b) source: {len(xs)} clean digits (source val accuracy {val:.4f}); target: "
          f"{len(xt)} unlabeled blended digits, {len(test[0])} held out "
          f"({time.time() - t0:.0f} s)", flush=True)

    for method, epochs, lr in (("coral", 20, 1e-3), ("dann", args.dann_epochs, args.dann_lr)):
        t0 = time.time()
        keras.utils.set_random_seed(0)
        m = keras.saving.load_model(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = tlkeras.adapt(m, source, target, method=method, epochs=epochs, learning_rate=lr,
                              domain_weight=args.domain_weight,
                              source_validation_data=source_val, seed=0, verbose=0)
        rows[method] = accuracy(r.model, *test)
        extra = (f", feature covariance gap {r.covariance_gap_before:.3g} -> "
                 f"{r.covariance_gap_after:.3g}" if method == "coral" else "")
        print(f"(b) {method}: {epochs} epochs, learning rate {lr:g}, checkpoint by "
              f"{r.selected_by} (epoch "
              f"{r.best_epoch}){extra} ({time.time() - t0:.0f} s)", flush=True)

    t0 = time.time()
    keras.utils.set_random_seed(0)
    m = keras.saving.load_model(path)
    tlkeras.fine_tune(m, tlkeras.data.from_arrays(xt, yt, batch_size=32, seed=0),
                      head_epochs=5, fine_tune_epochs=10, learning_rate=1e-2,
                      fine_tune_learning_rate=1e-3, verbose=0)
    rows["target-supervised (upper bound)"] = accuracy(m, *test)
    print(f"(b) upper bound: fine_tune on the {len(xt)} target images WITH labels "
          f"({time.time() - t0:.0f} s)")
    low, high = rows["source only"], rows["target-supervised (upper bound)"]
    print("| method | target accuracy | gap closed |")
    print("| --- | --- | --- |")
    for name, acc in rows.items():
        print(f"| {name} | {acc:.4f} | {(acc - low) / (high - low):.1%} |")


def part_c(args, split, pretrained, simclr):
    _, (xu, yu), _ = split
    x, y = xu[:1000], yu[:1000]
    print("| features | NMI (k=5) | purity (k=5) | k by silhouette | NMI (chosen k) | recall@10 |")
    print("| --- | --- | --- | --- | --- | --- |")
    keras.utils.set_random_seed(0)
    for name, base in (("random init", small_cnn(SIZE)),
                       ("pretrained (classes 0-4)", keras.saving.load_model(pretrained)),
                       ("pretrained + SimCLR", keras.saving.load_model(simclr))):
        fixed = tlkeras.cluster(base, x, n_clusters=5, labels=y)
        chosen = tlkeras.cluster(base, x, labels=y, max_clusters=10)
        found = tlkeras.similar(base, x[:800], x[800:], k=10, index_labels=y[:800],
                                query_labels=y[800:])
        print(f"| {name} | {fixed.nmi:.4f} | {fixed.purity:.4f} | {chosen.n_clusters} | "
              f"{chosen.nmi:.4f} | {found.recall_at_k:.4f} |", flush=True)


def part_x(args):
    """(c) again with ImageNet Xception features (the shared weights) vs the same net at random."""
    x, y = fashion()
    keep = np.flatnonzero(y >= 5)[:args.xception_images]
    x = tf.image.resize(x[keep], (71, 71)).numpy().astype("uint8")
    y = y[keep] - 5
    cut = len(x) * 4 // 5
    print("| Xception features (71x71) | NMI (k=5) | purity (k=5) | recall@10 |")
    print("| --- | --- | --- | --- |")
    for name, weights in (("random init", None), ("ImageNet", XCEPTION)):
        keras.utils.set_random_seed(0)
        model = tlkeras.build_transfer_model("Xception", 5, input_shape=(71, 71, 3),
                                             weights=weights)
        fixed = tlkeras.cluster(model, x, n_clusters=5, labels=y)
        found = tlkeras.similar(model, x[:cut], x[cut:], k=10, index_labels=y[:cut],
                                query_labels=y[cut:])
        print(f"| {name} | {fixed.nmi:.4f} | {fixed.purity:.4f} | {found.recall_at_k:.4f} |",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="abc", help="of a, b, c, x")
    parser.add_argument("--budgets", type=lambda s: [int(t) for t in s.split(",")],
                        default=[1, 10, 100])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--source_epochs", type=int, default=6)
    parser.add_argument("--simclr_epochs", type=int, default=10)
    parser.add_argument("--dann_epochs", type=int, default=15)
    parser.add_argument("--dann_lr", type=float, default=1e-3)
    parser.add_argument("--xception_images", type=int, default=500)
    parser.add_argument("--domain_weight", type=float, default=1.0)
    args = parser.parse_args()
    print(machine())
    start = time.time()
    split = fashion_split() if set(args.parts) & set("ac") else None
    bases = None
    if "a" in args.parts or "c" in args.parts:
        t0 = time.time()
        bases = part_a(args, split) if "a" in args.parts else None
        print(f"(a) {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}\n", flush=True)
    if "b" in args.parts:
        t0 = time.time()
        part_b(args)
        print(f"(b) {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}\n", flush=True)
    if "c" in args.parts:
        if bases is None:
            raise SystemExit("--parts c needs part a (it reuses a's bases): use --parts ac")
        t0 = time.time()
        part_c(args, split, *bases)
        print(f"(c) {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    if "x" in args.parts:
        t0 = time.time()
        part_x(args)
        print(f"(x) {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    print(f"total {time.time() - start:.0f} s; load average "
          + " ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
