"""Model fusion and distillation on Fashion-MNIST: tlkeras.ensemble and tlkeras.distill.

Part 1, fusion. Members trained on the same labeled images: three small CNNs at 28 px
fine-tuned from one checkpoint with different seeds and data orders (the soup's
ingredients) and a wider CNN at 32 px. Compared on held-out test images (accuracy,
negative log-likelihood, expected calibration error): the best single member (by test
accuracy), and `tlkeras.ensemble` with "average", "weighted" and "stacking" over all members
and "soup" (greedy) over the ingredients; "weighted", "stacking" and the greedy soup are fitted
on a validation set disjoint from the training images.

Part 2, distillation. The teacher is Xception at 71 px with the ImageNet weights of
../shared/weights, trained with tlkeras.fine_tune on the labeled images alone (head on cached
features, then the top blocks on cached activations). The student is a small CNN at 28 px,
trained from the same initialization either on the labeled images alone (plain Keras fit,
cross-entropy; for the same epochs, and for as many optimizer steps as the distilled one) or
with `tlkeras.distill` on the same labeled images plus unlabeled ones (teacher targets only;
the teacher runs once per image), for the same epochs. Reported: test accuracy, TFLite size
(float32) and TFLite latency per image on this CPU (batch 1, median of 30 runs).

    python bench/bench_fusion.py --part fusion --train 600   # part 1
    python bench/bench_fusion.py --part distill --train 400 --unlabeled 3000   # part 2
    python bench/bench_fusion.py --quick    # minutes: tiny subsets (no figures worth recording)
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tlkeras  # noqa: E402
from _common import FASHION_DIR, machine, read_idx  # noqa: E402
from tlkeras import fusion  # noqa: E402
from tlkeras.export import run_tflite  # noqa: E402

XCEPTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                        "weights", "xception_imagenet_notop.weights.h5")


def load(args):
    x = read_idx(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz")).astype("int32")
    xt = read_idx(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz"))[:args.test]
    yt = read_idx(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"))[:args.test]
    rgb = lambda a: np.repeat(a[..., None], 3, axis=-1)  # noqa: E731
    a, b, c = args.train, args.train + args.val, args.train + args.val + args.unlabeled
    return {"train": (rgb(x[:a]), y[:a]), "val": (rgb(x[a:b]), y[a:b]),
            "unlabeled": rgb(x[b:c]), "test": (rgb(xt), yt.astype("int32"))}


def cnn(size, widths, seed, name):
    """A small CNN (its own base) as a tlkeras transfer model at size x size."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for i, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    base = keras.Model(inputs, x, name=f"{name}_base")
    model = tlkeras.build_transfer_model(base, 10, input_shape=(size, size, 3), dropout=0.3,
                                         hidden_units=(64,), name=name)
    tlkeras.unfreeze(model, "all")
    return model


def fit(model, data, epochs, seed, lr=3e-3):
    keras.utils.set_random_seed(seed)
    x = tf.image.resize(data[0].astype("float32"), model.input_shape[1:3]).numpy()
    if not getattr(model, "optimizer", None):
        model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    model.fit(x, data[1], batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    return model


def scores(model, data):
    x, y = data
    size = model.input_shape[1:3]
    p = model.predict(tf.image.resize(x.astype("float32"), size).numpy(), batch_size=128,
                      verbose=0)
    nll = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1))))
    return {"accuracy": float(np.mean(p.argmax(-1) == y)), "nll": nll,
            "ece": fusion.calibration_error(p, y)}


def tflite_figures(model, directory, images):
    result = tlkeras.export_model(model, directory, formats=("tflite",),
                                  representative_data=images[:8])
    path = result.paths["tflite"]
    x = images[:1].astype("float32")
    run_tflite(path, x)
    times = []
    interpreter = tf.lite.Interpreter(model_path=path)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.allocate_tensors()
    for i in range(30):
        interpreter.set_tensor(inp["index"], images[i % len(images)][None].astype("float32"))
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
        interpreter.get_tensor(out["index"])
    return os.path.getsize(path), float(np.median(times))


def fusion_part(args, d):
    """Part 1: members and their fusion."""
    t = time.time()
    first = fit(cnn(28, (16, 32), 0, "cnn28"), d["train"], 2 if args.quick else 6, 0)
    ingredients = []
    for i in range(3):
        member = fusion._clone(first, f"cnn28_{i}")
        member.set_weights(first.get_weights())
        ingredients.append(fit(member, d["train"], 1 if args.quick else 4, 10 + i, lr=5e-4))
    wide = fit(cnn(32, (24, 48), 5, "cnn32"), d["train"], 2 if args.quick else 10, 5)
    members = ingredients + [wide]
    print(f"members trained in {time.time() - t:.1f} s")
    rows = {m.name: scores(m, d["test"]) for m in members}
    best_name = max(rows, key=lambda n: rows[n]["accuracy"])
    fused = {}
    for method in ("average", "weighted", "stacking"):
        t = time.time()
        model = tlkeras.ensemble(members, method=method,
                                 validation_data=None if method == "average" else d["val"])
        fused[method] = scores(model, d["test"])
        fused[method]["seconds"] = time.time() - t
    t = time.time()
    soup = tlkeras.ensemble(ingredients, method="soup", validation_data=d["val"])
    fused["soup"] = {**scores(soup, d["test"]), "seconds": time.time() - t}
    print(f"\n| model | test accuracy | NLL | ECE |\n| --- | --- | --- | --- |")
    for name, r in rows.items():
        mark = " (best single)" if name == best_name else ""
        print(f"| member {name}{mark} | {r['accuracy']:.4f} | {r['nll']:.4f} | {r['ece']:.4f} |")
    for name, r in fused.items():
        extra = f" (members {soup.soup_members})" if name == "soup" else ""
        print(f"| ensemble {name}{extra} | {r['accuracy']:.4f} | {r['nll']:.4f} | "
              f"{r['ece']:.4f} |")
    best = rows[best_name]
    winner = min(fused, key=lambda n: (fused[n]["nll"], -fused[n]["accuracy"]))
    met = fused[winner]["nll"] < best["nll"] and fused[winner]["accuracy"] > best["accuracy"]
    print(f"best fusion by NLL: {winner}; beats the best single member on NLL and accuracy: "
          f"{'met' if met else 'NOT met'}")


def distillation_part(args, d):
    """Part 2: an Xception teacher (ImageNet weights, fine-tuned on the labeled images)
    distilled into a small CNN, against the same CNN trained on the labels alone."""
    t = time.time()
    size = args.xception_size
    keras.utils.set_random_seed(0)
    teacher = tlkeras.build_transfer_model("Xception", 10, input_shape=(size, size, 3),
                                           weights=os.path.abspath(XCEPTION), name="xception")
    train_big = tlkeras.data.from_arrays(*d["train"], image_size=(size, size), batch_size=64,
                                         seed=0)
    tuned = tlkeras.fine_tune(teacher, train_big, head_epochs=args.teacher_head_epochs,
                              fine_tune_epochs=args.teacher_fine_tune_epochs,
                              unfreeze=args.teacher_unfreeze, head_learning_rate=1e-3, seed=0,
                              verbose=0)
    print(f"\nteacher: Xception at {size} px, ImageNet weights, tlkeras.fine_tune on the "
          f"{args.train} labeled images ({args.teacher_head_epochs} head epochs, "
          f"{args.teacher_fine_tune_epochs} epochs with the top {args.teacher_unfreeze} blocks "
          f"unfrozen; feature cache: {tuned.used_feature_cache}) in {time.time() - t:.1f} s")
    t = time.time()
    teacher_scores = scores(teacher, d["test"])
    print(f"teacher evaluated on {args.test} test images in {time.time() - t:.1f} s")

    widths = tuple(int(w) for w in args.student_widths.split(","))
    student = lambda: cnn(28, widths, 7, "student")  # noqa: E731  (one initialization)
    batches = -(-args.train // 64), -(-args.unlabeled // 64)
    same_steps = args.epochs * sum(batches) // batches[0]
    t = time.time()
    label_only = fit(student(), d["train"], args.epochs, 7)
    label_only_long = fit(student(), d["train"], same_steps, 7)
    print(f"label-only students ({args.epochs} and {same_steps} epochs) in "
          f"{time.time() - t:.1f} s")
    labeled = tf.data.Dataset.from_tensor_slices(d["train"]).shuffle(4096, seed=7).batch(64)
    unlabeled = tf.data.Dataset.from_tensor_slices(d["unlabeled"]).batch(64)
    t = time.time()
    result = tlkeras.distill(teacher, student(), labeled, unlabeled_data=unlabeled,
                             alpha=args.alpha, temperature=args.temperature, epochs=args.epochs,
                             learning_rate=3e-3, seed=7, verbose=0)
    print(f"distilled in {time.time() - t:.1f} s (the teacher ran once over the "
          f"{args.train + args.unlabeled} images; alpha {args.alpha}, temperature "
          f"{args.temperature})")
    with tempfile.TemporaryDirectory() as tmp:
        images = tf.image.resize(d["test"][0][:64].astype("float32"), (size, size)).numpy()
        small = tf.image.resize(d["test"][0][:64].astype("float32"), (28, 28)).numpy()
        figures = {
            "teacher (Xception)": (teacher_scores, *tflite_figures(teacher, f"{tmp}/t", images)),
            f"student, labels only, {args.epochs} epochs": (
                scores(label_only, d["test"]), *tflite_figures(label_only, f"{tmp}/l", small)),
            f"student, labels only, {same_steps} epochs (as many steps as distilled)": (
                scores(label_only_long, d["test"]),
                *tflite_figures(label_only_long, f"{tmp}/ll", small)),
            f"student, distilled, {args.epochs} epochs": (
                scores(result.model, d["test"]), *tflite_figures(result.model, f"{tmp}/d", small))}
    print("\n| model | test accuracy | TFLite size | TFLite latency / image (CPU, batch 1) |")
    print("| --- | --- | --- | --- |")
    for name, (s, size_bytes, latency) in figures.items():
        print(f"| {name} | {s['accuracy']:.4f} | {size_bytes / 1e6:.3f} MB | "
              f"{latency * 1000:.2f} ms |")
    rows = list(figures.values())
    (teacher_s, teacher_size, _), (dist_s, dist_size, _) = rows[0], rows[-1]
    baseline = max(rows[1][0]["accuracy"], rows[2][0]["accuracy"])
    gain = 100 * (dist_s["accuracy"] - baseline)
    kept = dist_s["accuracy"] / teacher_s["accuracy"]
    print(f"distilled vs the better label-only student: {gain:+.2f} points (goal >= +1: "
          f"{'met' if gain >= 1 else 'NOT met'}); {kept:.2%} of the teacher's accuracy (goal "
          f">= 95%: {'met' if kept >= 0.95 else 'NOT met'}) at {dist_size / teacher_size:.4f} "
          f"of its size (goal <= 0.2: {'met' if dist_size <= 0.2 * teacher_size else 'NOT met'})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "fusion", "distill"), default="all")
    p.add_argument("--train", type=int, default=500, help="labeled images")
    p.add_argument("--val", type=int, default=300, help="validation images (fusion only)")
    p.add_argument("--unlabeled", type=int, default=6000, help="unlabeled images (distill)")
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=15, help="student epochs")
    p.add_argument("--xception_size", type=int, default=71)
    p.add_argument("--teacher_head_epochs", type=int, default=30)
    p.add_argument("--teacher_fine_tune_epochs", type=int, default=10)
    p.add_argument("--teacher_unfreeze", type=int, default=2, help="top Xception blocks")
    p.add_argument("--student_widths", default="16,32")
    p.add_argument("--alpha", type=float, default=0.3, help="weight of the labels' loss")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.train, args.val, args.unlabeled, args.test, args.epochs = 100, 100, 200, 100, 2
        args.teacher_head_epochs, args.teacher_fine_tune_epochs = 2, 1
    print(machine())
    print(f"Fashion-MNIST: {args.train} labeled, {args.val} validation, {args.unlabeled} "
          f"unlabeled (train split), {args.test} test (t10k)")
    start = time.time()
    d = load(args)
    if args.part in ("all", "fusion"):
        fusion_part(args, d)
    if args.part in ("all", "distill"):
        distillation_part(args, d)
    print(f"\ntotal {time.time() - start:.1f} s; load average (1/5/15 min): "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
