"""Fashion-MNIST with Xception, offline: Debian's data files and a local weights file.

Reads the IDX files of `apt-get install dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist) and loads ImageNet weights from
`../shared/weights/xception_imagenet_notop.weights.h5` when that file exists
(else Keras downloads them). The 28x28 grayscale images become RGB at
`--image_size` (Xception needs at least 71).

    python -m recipes.fashion_mnist --train_limit 10000
    python -m recipes.fashion_mnist --smoke    # 60 training images, the head only
"""

import gzip
import os

import numpy as np

import tlkeras
from recipes import parser

DATA_DIR = "/usr/share/datasets/fashion-mnist"
WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "shared", "weights", "xception_imagenet_notop.weights.h5")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def read_idx(path):
    """A gzipped IDX file (the MNIST format) as a numpy array."""
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split, limit=None):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(DATA_DIR, f"{prefix}-images-idx3-ubyte.gz"))[:limit]
    y = read_idx(os.path.join(DATA_DIR, f"{prefix}-labels-idx1-ubyte.gz"))[:limit]
    return x, y.astype("int32")


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--train_limit", type=int, default=10000, help="training images used")
    p.add_argument("--test_limit", type=int, default=None)
    args = p.parse_args(argv)
    out = args.output_dir or os.path.join("runs", "fashion_mnist")
    size = 71 if args.smoke else args.image_size
    if not os.path.isdir(DATA_DIR):
        raise SystemExit(f"{DATA_DIR} is missing: apt-get install dataset-fashion-mnist")
    x, y = load("train", 60 if args.smoke else args.train_limit)
    x_test, y_test = load("test", 30 if args.smoke else args.test_limit)
    train = tlkeras.data.from_arrays(x, y, image_size=(size, size), class_names=CLASSES,
                                     batch_size=16 if args.smoke else 64, seed=1)
    test = tlkeras.data.from_arrays(x_test, y_test, image_size=(size, size), class_names=CLASSES,
                                    batch_size=64, shuffle=False)
    weights = WEIGHTS if os.path.isfile(WEIGHTS) else "imagenet"
    print(f"Xception weights: {weights}")
    model = tlkeras.build_transfer_model("Xception", num_classes=10, input_shape=(size, size, 3),
                                         weights=weights)
    # --smoke trains the head only: phase 2 would trace Xception's training step (slow on a CPU).
    tlkeras.fine_tune(model, train, test, head_epochs=3 if args.smoke else 5,
                      fine_tune_epochs=0 if args.smoke else 2, unfreeze=2, run_dir=out, seed=1)
    report = tlkeras.evaluate(model, test, CLASSES, output_dir=out, overwrite=True)
    print(f"test accuracy {report.metrics['accuracy']:.3f} on {report.num_samples} images; "
          f"report in {out}")
    return {"accuracy": report.metrics["accuracy"], "weights": weights, "log_dir": out}


if __name__ == "__main__":
    main()
