"""Runnable recipes built only on tlkeras's public API: `python -m recipes.<name> [--smoke]`.

- `flowers`: tf_flowers with EfficientNetB0, two-phase fine-tuning, evaluation, export.
- `cats_vs_dogs`: MobileNetV2 at 160 px, as in TensorFlow's transfer-learning tutorial.
- `fashion_mnist`: Xception on Fashion-MNIST read from Debian's `dataset-fashion-mnist` files.
- `text_classification`: a BERT-family KerasHub preset (all-MiniLM-L6-v2 offline) on raw text.
- `features_svm`: frozen base features into a scikit-learn SVM.
- `face_recognition`: embeddings from a pretrained base, a classifier and a verification threshold.
- `domain_shift`: clean digits to digits on photo textures: SimCLR pretraining, CORAL, clustering.
- `distill_to_mobile`: an Xception teacher distilled into MobileNetV3Small with unlabeled images.

`--smoke` runs each recipe offline in seconds on tiny local or mocked data and
random weights (what the tests run); without it the recipe downloads the real
data set and ImageNet weights (or uses their offline copies where noted).
"""

import argparse
import os

import numpy as np


def parser(description):
    """The common arguments of every recipe."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="offline, tiny data, random weights: a seconds-long check that it runs")
    p.add_argument("--output_dir", default=None, help="run folder (default: runs/<recipe>)")
    return p


def mocked_tfds(num_examples=12):
    """A context in which TFDS data sets yield random examples (`tfds.testing.mock_data`)."""
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=num_examples)


def synthetic_image_folder(path, num_classes=3, per_class=8, size=32, seed=0):
    """Writes a folder of PNGs, one subfolder per class; each class has its own color and
    stripe direction plus noise, so even random features separate the classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = [f"class_{i}" for i in range(num_classes)]
    for i, name in enumerate(names):
        os.makedirs(os.path.join(path, name), exist_ok=True)
        color = rng.integers(40, 216, 3)
        stripes = (np.arange(size)[:, None] if i % 2 else np.arange(size)[None, :]) % 8 < 4
        for j in range(per_class):
            image = color + 40 * stripes[..., None] + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype("uint8")).save(
                os.path.join(path, name, f"{j}.png"))
    return names
