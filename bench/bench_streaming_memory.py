"""Peak memory while streaming one epoch from a folder, and a folder 10x larger.

Each configuration runs in a fresh process that reports its own peak RSS
(``ru_maxrss``): tlkeras.data.from_directory and keras.utils.image_dataset_from_directory
streaming from disk, and tlkeras with ``cache=True`` (in memory) as the contrast that
grows with the data.

    python bench/bench_streaming_memory.py           # 1000 vs 10000 JPEGs (128px -> 96px)
    python bench/bench_streaming_memory.py --quick   # 300 vs 3000
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def child(tool, folder, size):
    import keras

    from tlkeras import data

    t0 = time.perf_counter()
    if tool == "keras":
        ds = keras.utils.image_dataset_from_directory(folder, image_size=(size, size),
                                                      batch_size=32, seed=0, verbose=False)
    else:
        ds = data.from_directory(folder, size, batch_size=32, seed=0,
                                 cache=tool == "tlkeras-cache")
    before = rss_mb()
    n, during = 0, before
    for x, _ in ds:
        n += int(x.shape[0])
        during = max(during, rss_mb())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": n, "seconds": time.perf_counter() - t0, "peak_mb": peak,
                      "before_mb": before, "epoch_max_mb": during}))


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--child", nargs=2, metavar=("TOOL", "FOLDER"))
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.size)

    from _common import jpeg_folder, machine

    print(machine())
    n = a.n or (300 if a.quick else 1000)
    folders = {n: jpeg_folder(n, 128), 10 * n: jpeg_folder(10 * n, 128)}
    env = dict(os.environ, TLKERAS_CACHE_DIR=tempfile.mkdtemp(prefix="tlk_mem_cache_"),
               TF_CPP_MIN_LOG_LEVEL="2")
    print(f"one epoch, image_size {a.size}, batch 32, shuffle=True; peak RSS of a fresh process")
    print("RSS in MB: after building the dataset / highest while iterating (sampled every "
          "batch) / process peak (ru_maxrss, includes importing TF)")
    print(f"{'pipeline':40s} {'images':>7s} {'built':>7s} {'epoch max':>10s} {'peak':>6s} "
          f"{'seconds':>8s}")
    peaks = {}
    for tool in ("tlkeras", "keras", "tlkeras-cache"):
        for count, folder in folders.items():
            out = subprocess.run([sys.executable, __file__, "--size", str(a.size), "--child",
                                  tool, folder], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[tool, count] = r["epoch_max_mb"]
            label = {"tlkeras": "tlkeras from_directory (streaming)",
                     "keras": "keras image_dataset_from_directory",
                     "tlkeras-cache": "tlkeras from_directory(cache=True)"}[tool]
            print(f"{label:40s} {r['images']:7d} {r['before_mb']:7.0f} {r['epoch_max_mb']:10.0f} "
                  f"{r['peak_mb']:6.0f} {r['seconds']:8.1f}")
    for tool in ("tlkeras", "keras", "tlkeras-cache"):
        small, big = peaks[tool, n], peaks[tool, 10 * n]
        print(f"{tool:14s} max RSS during the epoch, 10x data vs 1x: {big / small:.2f}x "
              f"({big - small:+.0f} MB)")


if __name__ == "__main__":
    main()
