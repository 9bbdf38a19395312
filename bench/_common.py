"""Shared helpers for the benchmarks: machine description and real JPEG folders."""

import concurrent.futures
import os
import platform
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recipes.fashion_mnist import read_idx  # noqa: E402  (one IDX reader for recipe and benches)

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "boot"]


def machine():
    """One line per fact about this machine, as printed at the top of every benchmark."""
    import keras
    import tensorflow as tf

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    lines = [f"platform: {platform.platform()}", f"python: {sys.version.split()[0]}",
             f"cpu: {cpu}, {os.cpu_count()} cores ({usable} usable)",
             f"gpu: {', '.join(gpus) or 'none'}",
             f"tensorflow {tf.__version__}, keras {keras.__version__}",
             "load average (1/5/15 min): " + " ".join(f"{x:.1f}" for x in os.getloadavg())]
    return "\n".join(lines)


def source_images():
    """(images uint8 (N, 28, 28) or (N, 8, 8), labels, class names): Fashion-MNIST when
    installed (apt-get install dataset-fashion-mnist), else scikit-learn digits."""
    path = os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")
    if os.path.exists(path):
        labels = read_idx(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz"))
        return read_idx(path), labels, FASHION_CLASSES, "fashion-mnist"
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * 255 / 16).astype(np.uint8), d.target, [str(i) for i in range(10)], "digits"


def jpeg_folder(n, size, root="/tmp/tlkeras_bench"):
    """A folder of n RGB JPEGs (size x size, upsampled), one subfolder per class.
    Made once and reused."""
    images, labels, names, source = source_images()
    folder = os.path.join(root, f"{source}_{n}_{size}")
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder

    def write(i):
        k = i % len(images)
        img = Image.fromarray(images[k]).resize((size, size), Image.BILINEAR).convert("RGB")
        d = os.path.join(folder, names[labels[k]])
        img.save(os.path.join(d, f"{i:06d}.jpg"), quality=90)

    for name in names:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(n)))
    open(done, "w").close()
    return folder
