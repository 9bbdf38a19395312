"""Phase-2 training throughput (images/s): tlkeras fine_tune vs plain Keras, fp32 vs mixed precision.

Also times the input pipeline alone. Prints the machine it ran on.

    python bench/bench_throughput.py --quick                 # CPU, a minute or two
    python bench/bench_throughput.py --base EfficientNetB0 --size 224 --images 4096 --batch 128
"""

import argparse
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import tlkeras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402


def dataset(n, size, batch):
    x = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.random.default_rng(1).integers(0, 10, n).astype("int32")
    return tlkeras.data.from_arrays(x, y, batch_size=batch, seed=0), n


def time_pipeline(ds, n):
    for _ in ds.take(1):
        pass
    start = time.perf_counter()
    for _ in ds:
        pass
    return n / (time.perf_counter() - start)


class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.last = time.perf_counter() - self.start


def tlkeras_phase2(args, ds, n, precision):
    model = tlkeras.build_transfer_model(args.base, 10, input_shape=(args.size, args.size, 3), weights=None)
    timer = Timer()
    tlkeras.fine_tune(model, ds, head_epochs=0, fine_tune_epochs=2, unfreeze="all", precision=precision,
                      jit_compile=args.jit, callbacks=[timer], verbose=0)
    return n / timer.last  # second epoch: compiled


def plain_keras_phase2(args, ds, n, precision):
    keras.mixed_precision.set_global_policy(precision)
    try:
        base = getattr(keras.applications, args.base)(include_top=False, weights=None,
                                                      input_shape=(args.size, args.size, 3), pooling="avg")
        inputs = keras.Input((args.size, args.size, 3))
        outputs = keras.layers.Dense(10, activation="softmax", dtype="float32")(base(inputs, training=False))
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.Adam(5e-5), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=args.jit)
        timer = Timer()
        model.fit(ds, epochs=2, callbacks=[timer], verbose=0)
        return n / timer.last
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="MobileNetV2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--quick", action="store_true", help="CPU-sized run: 96 px, 256 images")
    args = parser.parse_args()
    if args.quick:
        args.size, args.images, args.batch = 96, 256, 32
    print(machine())
    print(f"base {args.base} at {args.size}px, {args.images} images, batch {args.batch}, jit={args.jit}")
    ds, n = dataset(args.images, args.size, args.batch)
    print(f"input pipeline alone: {time_pipeline(ds, n):,.0f} images/s")
    precisions = ["float32", "mixed_bfloat16"] if not tf.config.list_physical_devices("GPU") else \
        ["float32", "mixed_float16"]
    for precision in precisions:
        ours = tlkeras_phase2(args, ds, n, precision)
        plain = plain_keras_phase2(args, ds, n, precision)
        print(f"{precision:>15}: tlkeras fine_tune {ours:8,.1f} images/s | plain Keras fit {plain:8,.1f} images/s"
              f" | ratio {ours / plain:.2f}")


if __name__ == "__main__":
    main()
