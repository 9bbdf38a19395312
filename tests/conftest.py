"""Shared fixtures: small real data (scikit-learn digits) as RGB images."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XCEPTION_WEIGHTS = os.path.join(
    os.path.dirname(REPO), "shared", "weights", "xception_imagenet_notop.weights.h5"
)


def digits_rgb(size=32, classes=None, seed=0):
    """scikit-learn digits as uint8 RGB images of `size` x `size`, with int labels."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images, digits.target
    if classes is not None:
        keep = np.isin(y, classes)
        x, y = x[keep], y[keep]
        y = np.searchsorted(np.asarray(sorted(classes)), y)
    x = (x / 16.0 * 255.0).astype("float32")[..., None]
    x = tf.image.resize(x, (size, size), method="bilinear").numpy()
    x = np.repeat(np.clip(x, 0, 255).astype("uint8"), 3, axis=-1)
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order].astype("int32")


# scripts/test.sh runs files on three xdist workers (--dist loadfile --no-loadscope-reorder) in
# collection order; the longest files (roughly, from the slowest tests of the last full runs) go
# first, so that no long file starts last while the other workers sit idle.
LONGEST_FIRST = ["test_recipes.py", "test_text.py", "test_training.py", "test_backbones.py",
                 "test_explain.py", "test_cli.py", "test_layout.py", "test_tuning.py",
                 "test_notebooks.py", "test_cli_fusion.py", "test_fusion.py", "test_optimizers.py",
                 "test_unlabeled.py", "test_demo.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


@pytest.fixture(autouse=True)
def _reset_keras_state():
    # A test that never imports Keras (the notebooks run in their own kernels) has no state to
    # reset, and is spared the TensorFlow import.
    keras = sys.modules.get("keras")
    policy = keras.mixed_precision.global_policy().name if keras else "float32"
    yield
    keras = sys.modules.get("keras")
    if keras is not None:
        keras.mixed_precision.set_global_policy(policy)
        # Without Python's full garbage collection, which clear_session runs by default: it
        # took 1-2 s of CPU after every test, more as the process grows (automatic
        # collection still frees memory).
        keras.backend.clear_session(free_memory=False)


@pytest.fixture(scope="session")
def digits32():
    return digits_rgb(32)
