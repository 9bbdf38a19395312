"""Model fusion and distillation on Fashion-MNIST: tlkeras.ensemble and tlkeras.distill.

Part 1, fusion. Members trained on the same labeled images: three small CNNs at 28 px
fine-tuned from one checkpoint with different seeds and data orders (the soup's
ingredients) and a wider CNN at 32 px. Compared on held-out test images (accuracy,
negative log-likelihood, expected calibration error): the best single member (by test
accuracy), and `tlkeras.ensemble` with "average", "weighted" and "stacking" over all members
and "soup" (greedy) over the ingredients; "weighted", "stacking" and the greedy soup are fitted
on a validation set disjoint from the training images.

Part 2, distillation. The teacher is a weighted ensemble of an Xception member at 71 px
(ImageNet weights from ../shared/weights, base frozen, head trained with tlkeras.fine_tune)
and the part-1 members. The student is a small CNN at 28 px, trained from the same
initialization for the same epochs either on the labeled images alone (plain Keras fit,
cross-entropy) or with `tlkeras.distill` on the labeled images plus unlabeled ones (teacher
targets only). Reported: test accuracy, TFLite size and TFLite latency per image on this
CPU (batch 1, median of repeated runs).

    python bench/bench_fusion.py            # 600 labeled, 300 validation, 1200 unlabeled, 500 test
    python bench/bench_fusion.py --quick    # a minute: tiny subsets (no figures worth recording)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--unlabeled", type=int, default=1200)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--epochs", type=int, default=15, help="student epochs")
    p.add_argument("--xception_size", type=int, default=71)
    p.add_argument("--teacher", choices=("xception", "members"), default="xception",
                   help="members: the part-1 members alone (no Xception; for a loaded machine)")
    p.add_argument("--student_widths", default="16,32")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.train, args.val, args.unlabeled, args.test, args.epochs = 200, 100, 200, 200, 2
    print(machine())
    print(f"Fashion-MNIST: {args.train} labeled, {args.val} validation, {args.unlabeled} "
          f"unlabeled (train split), {args.test} test (t10k)")
    start = time.time()
    d = load(args)

    # Part 1: members and their fusion.
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

    # Part 2: an Xception-based teacher distilled into a small CNN.
    t = time.time()
    size = args.xception_size if args.teacher == "xception" else 32
    if args.teacher == "xception":
        keras.utils.set_random_seed(0)
        xception = tlkeras.build_transfer_model("Xception", 10, input_shape=(size, size, 3),
                                                weights=os.path.abspath(XCEPTION),
                                                name="xception")
        train71 = tlkeras.data.from_arrays(*d["train"], image_size=(size, size), batch_size=64,
                                           seed=0)
        tlkeras.fine_tune(xception, train71, head_epochs=2 if args.quick else 30,
                          fine_tune_epochs=0, verbose=0)
        members = [xception] + members
    teacher = tlkeras.ensemble(members, method="weighted", validation_data=d["val"],
                               name="teacher")
    with_xception = f"Xception {size} px head + " if args.teacher == "xception" else ""
    print(f"\nteacher ({with_xception}the part-1 members, weighted: "
          f"{[round(w, 3) for w in teacher.get_layer('predictions').member_weights]}) built in "
          f"{time.time() - t:.1f} s")
    t = time.time()
    teacher_scores = scores(teacher, d["test"])
    print(f"teacher evaluated in {time.time() - t:.1f} s")

    widths = tuple(int(w) for w in args.student_widths.split(","))
    label_only = fit(cnn(28, widths, 7, "student"), d["train"], args.epochs, 7)
    student = cnn(28, widths, 7, "student")  # the same initialization
    labeled = tf.data.Dataset.from_tensor_slices(d["train"]).shuffle(4096, seed=7).batch(64)
    unlabeled = tf.data.Dataset.from_tensor_slices(d["unlabeled"]).batch(64)
    t = time.time()
    result = tlkeras.distill(teacher, student, labeled, unlabeled_data=unlabeled, alpha=0.3,
                             temperature=2.0, epochs=args.epochs, learning_rate=2e-3, seed=7,
                             verbose=0)
    print(f"distilled in {time.time() - t:.1f} s (teacher run once over "
          f"{args.train + args.unlabeled} images)")
    with tempfile.TemporaryDirectory() as tmp:
        images = tf.image.resize(d["test"][0][:64].astype("float32"), (size, size)).numpy()
        small = tf.image.resize(d["test"][0][:64].astype("float32"), (28, 28)).numpy()
        figures = {"teacher": (teacher_scores, *tflite_figures(teacher, f"{tmp}/t", images)),
                   "student, labels only": (scores(label_only, d["test"]),
                                            *tflite_figures(label_only, f"{tmp}/l", small)),
                   "student, distilled": (scores(result.model, d["test"]),
                                          *tflite_figures(result.model, f"{tmp}/d", small))}
    print("\n| model | test accuracy | TFLite size | TFLite latency / image (CPU, batch 1) |")
    print("| --- | --- | --- | --- |")
    for name, (s, size_bytes, latency) in figures.items():
        print(f"| {name} | {s['accuracy']:.4f} | {size_bytes / 1e6:.3f} MB | "
              f"{latency * 1000:.2f} ms |")
    teacher_acc, teacher_size = figures["teacher"][0]["accuracy"], figures["teacher"][1]
    dist_acc, dist_size = figures["student, distilled"][0]["accuracy"], figures[
        "student, distilled"][1]
    gain = 100 * (dist_acc - figures["student, labels only"][0]["accuracy"])
    print(f"distilled vs label-only: {gain:+.2f} points (goal >= +1: "
          f"{'met' if gain >= 1 else 'NOT met'}); {dist_acc / teacher_acc:.1%} of the teacher's "
          f"accuracy (goal >= 95%: {'met' if dist_acc >= 0.95 * teacher_acc else 'NOT met'}) at "
          f"{dist_size / teacher_size:.4f} of its size (goal <= 0.2: "
          f"{'met' if dist_size <= 0.2 * teacher_size else 'NOT met'})")
    print(f"\ntotal {time.time() - start:.1f} s; load average (1/5/15 min): "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
