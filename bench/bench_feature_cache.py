"""Frozen-base head training: feature cache vs recomputing the base every epoch.

Both runs start from the same model (same seed), the same images (decoded once into an
in-memory tf.data cache before timing, so only the model work differs), batch size,
optimizer, ``steps_per_execution`` and E epochs:

* recompute: ``model.fit(images, epochs=E)`` with the base frozen (the plain Keras way);
* cached:    ``extract_features(model, images)`` once, then ``head.fit`` on the features
  for E epochs (the head is shared with the model, so the model is trained).

Goal: speed-up >= 0.8 * E. Held-out accuracy of both models is printed as a sanity check.

    python bench/bench_feature_cache.py          # MobileNetV2 (random init) 96px, 1000 images
    python bench/bench_feature_cache.py --quick  # 300 images
    python bench/bench_feature_cache.py --base xception  # ImageNet weights, ../shared/weights
"""

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tlkeras  # noqa: E402
from _common import jpeg_folder, machine  # noqa: E402
from tlkeras import data  # noqa: E402
from tlkeras.features import extract_features, features_dataset  # noqa: E402

XCEPTION = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "weights",
                        "xception_imagenet_notop.weights.h5")


def build(base, size, seed):
    keras.utils.set_random_seed(seed)
    if base == "xception":
        return tlkeras.build_transfer_model("Xception", 10, input_shape=(size, size, 3),
                                            weights=os.path.abspath(XCEPTION))
    return tlkeras.build_transfer_model("MobileNetV2", 10, input_shape=(size, size, 3),
                                        weights=None)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--base", choices=["mobilenetv2", "xception"], default="mobilenetv2")
    p.add_argument("--steps-per-execution", type=int, default=32,
                   help="Keras compile(steps_per_execution=...), the same for both runs")
    a = p.parse_args()
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # our datasets shuffle
    n = a.n or (300 if a.quick else 1000)
    print(machine())
    folder = jpeg_folder(n + 500, 128)
    train, test = data.from_directory(folder, a.size, validation_split=500 / (n + 500),
                                      subset="both", seed=0, batch_size=a.batch_size, cache=True)
    for ds in (train, test):  # decode into the in-memory cache, untimed
        for _ in ds:
            pass
    print(f"base {a.base} ({'ImageNet weights' if a.base == 'xception' else 'weights=None'}), "
          f"{a.size}px, {len(train.file_paths)} train / {len(test.file_paths)} test images, "
          f"batch {a.batch_size}, E={a.epochs} epochs, Adam 1e-3, "
          f"steps_per_execution={a.steps_per_execution}")

    recompute = build(a.base, a.size, seed=1)
    recompute.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                      metrics=["accuracy"], steps_per_execution=a.steps_per_execution)
    t0, c0 = time.perf_counter(), time.process_time()
    recompute.fit(train, epochs=a.epochs, verbose=0)
    t_recompute, c_recompute = time.perf_counter() - t0, time.process_time() - c0

    cached = build(a.base, a.size, seed=1)
    t0, c0 = time.perf_counter(), time.process_time()
    fs = extract_features(cached, train, verbose=0)
    t_extract = time.perf_counter() - t0
    _, head = tlkeras.split_model(cached)
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                 metrics=["accuracy"], steps_per_execution=a.steps_per_execution)
    head.fit(features_dataset(fs, batch_size=a.batch_size, seed=0), epochs=a.epochs, verbose=0)
    t_cached, c_cached = time.perf_counter() - t0, time.process_time() - c0

    acc = {}
    for name, model in (("recompute", recompute), ("cached", cached)):
        model.compile(metrics=["accuracy"], loss="sparse_categorical_crossentropy")
        acc[name] = model.evaluate(test, verbose=0)[1]
    print(f"recompute base every epoch: wall {t_recompute:7.1f} s  cpu {c_recompute:7.1f} s  "
          f"test accuracy {acc['recompute']:.3f}")
    print(f"feature cache:              wall {t_cached:7.1f} s  cpu {c_cached:7.1f} s  "
          f"(extraction wall {t_extract:.1f} s, head {t_cached - t_extract:.1f} s)  "
          f"test accuracy {acc['cached']:.3f}")
    for what, speedup in (("wall", t_recompute / t_cached), ("cpu", c_recompute / c_cached)):
        print(f"speed-up ({what} time) {speedup:.2f}x for E={a.epochs} (goal >= "
              f"{0.8 * a.epochs:.1f}x): {'met' if speedup >= 0.8 * a.epochs else 'NOT met'}")


if __name__ == "__main__":
    main()
