"""Input throughput: tlkeras.data.from_directory vs keras.utils.image_dataset_from_directory.

Same folder of real JPEGs (Fashion-MNIST, upsampled), same image size, batch size and
shuffling; images/s over full epochs (the first epoch of each is a warm-up and reported
separately). Also times tlkeras' scan (cold, then cached), and then adds three broken files
to show that the Keras pipeline crashes mid-epoch while tlkeras skips and reports them.

    python bench/bench_input_pipeline.py            # 6000 JPEGs 128px -> 96px
    python bench/bench_input_pipeline.py --quick    # 1000 JPEGs
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from _common import jpeg_folder, machine  # noqa: E402
from tlkeras import data  # noqa: E402


def epoch_rate(ds, n):
    """(images/s wall, CPU ms per image) of one full epoch."""
    t0, c0 = time.perf_counter(), time.process_time()
    count = 0
    for x, _ in ds:
        count += int(x.shape[0])
    assert count == n, (count, n)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) * 1000 / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    n = a.n or (1000 if a.quick else 6000)
    print(machine())
    folder = jpeg_folder(n, 128)
    print(f"folder: {folder} ({n} JPEGs, 128x128, 10 classes) -> image_size {a.size}, "
          f"batch {a.batch_size}, shuffle=True, {a.epochs} epochs each")
    os.environ["TLKERAS_CACHE_DIR"] = tempfile.mkdtemp(prefix="tlk_bench_cache_")
    size = (a.size, a.size)

    t0 = time.perf_counter()
    data.scan_images(folder)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    data.scan_images(folder)
    warm = time.perf_counter() - t0
    print(f"tlkeras scan: first {cold:.2f} s ({n / cold:.0f} files/s), "
          f"cached {warm:.3f} s ({n / warm:.0f} files/s)")

    results = {}
    makers = {
        "keras.utils.image_dataset_from_directory":
            lambda: keras.utils.image_dataset_from_directory(
                folder, image_size=size, batch_size=a.batch_size, shuffle=True, seed=0,
                verbose=False),
        "tlkeras.data.from_directory": lambda: data.from_directory(
            folder, size, batch_size=a.batch_size, shuffle=True, seed=0),
    }
    for rnd in range(a.rounds):  # alternating rounds, so neither gains from its position
        for name, make in makers.items():
            t0 = time.perf_counter()
            ds = make()
            build = time.perf_counter() - t0
            rates = [epoch_rate(ds, n) for _ in range(a.epochs)]
            results.setdefault(name, []).extend(rates[1:])
            print(f"round {rnd + 1} {name:42s} build {build:5.2f} s  first epoch "
                  f"{rates[0][0]:5.0f} img/s  later epochs "
                  + "  ".join(f"{r:.0f} img/s {c:.2f} cpu-ms/img" for r, c in rates[1:]))
    med = {name: [sorted(v)[len(v) // 2] for v in zip(*r)] for name, r in results.items()}
    (k, kc), (t, tc) = med.values()
    print(f"median of later epochs: keras {k:.0f} img/s ({kc:.2f} cpu-ms/img), "
          f"tlkeras {t:.0f} img/s ({tc:.2f} cpu-ms/img)")
    print(f"throughput ratio tlkeras / keras: {t / k:.2f} (wall), {kc / tc:.2f} (cpu)")

    broken = tempfile.mkdtemp(prefix="tlk_bench_broken_")
    shutil.copytree(folder, broken, dirs_exist_ok=True)
    cls = os.path.join(broken, sorted(d for d in os.listdir(folder) if not d.startswith("."))[0])
    open(os.path.join(cls, "zero.jpg"), "wb").close()
    with open(os.path.join(cls, "notes.jpg"), "w") as f:
        f.write("not an image")
    good = os.path.join(cls, sorted(os.listdir(cls))[0])
    with open(good, "rb") as f, open(os.path.join(cls, "truncated.jpg"), "wb") as g:
        g.write(f.read()[:300])
    seen = 0
    try:
        for x, _ in keras.utils.image_dataset_from_directory(broken, image_size=size,
                                                             batch_size=a.batch_size, seed=0,
                                                             verbose=False):
            seen += int(x.shape[0])
        print(f"keras on the folder with 3 broken files: no crash ({seen} images)")
    except tf.errors.InvalidArgumentError as e:
        why = re.sub(r"\{\{.*?\}\}\s*", "", e.message).splitlines()[0][:100]
        print(f"keras on the folder with 3 broken files: CRASHED after {seen} images: {why}")
    ds = data.from_directory(broken, size, batch_size=a.batch_size, seed=0)
    seen = sum(int(x.shape[0]) for x, _ in ds)
    print(f"tlkeras on the same folder: {seen} images, skipped "
          f"{[(os.path.basename(p), r) for p, r in ds.scan_report.bad]}")
    shutil.rmtree(broken)


if __name__ == "__main__":
    main()
