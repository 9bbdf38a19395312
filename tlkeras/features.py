"""Feature cache: run the frozen base once, then train the head on its features.

With the base frozen and no augmentation, every epoch of head training sees
the same pooled features, so computing them once gives the same head weights
(see ``tests/test_features.py``) at a fraction of the cost.

Example:

>>> import keras, numpy as np, tensorflow as tf, tlkeras
>>> from tlkeras.features import extract_features, features_dataset
>>> images = np.random.default_rng(0).uniform(0, 255, (16, 16, 16, 3)).astype("float32")
>>> train_ds = tf.data.Dataset.from_tensor_slices((images, np.arange(16) % 2)).batch(8)
>>> base = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3)], name="tiny")
>>> model = tlkeras.build_transfer_model(base, 2)
>>> train = extract_features(model, train_ds, cache_dir="feature_cache", key="train", verbose=0)
>>> train.features.shape
(16, 4)
>>> _, head = tlkeras.split_model(model)
>>> head.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
>>> history = head.fit(features_dataset(train), epochs=2, verbose=0)
>>> model.predict(images, verbose=0).shape  # the head trained in place: model is ready
(16, 2)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from tlkeras import anatomy, atomic

logger = logging.getLogger(__name__)

__all__ = ["FeatureSet", "extract_features", "features_dataset", "fit_sklearn", "sklearn_labels"]


@dataclasses.dataclass
class FeatureSet:
    """Pooled features ``(N, D)`` float32 and their labels (or None).

    Unpacks as ``features, labels = feature_set``; ``cache_path`` is the
    ``.npz`` file it was saved to or loaded from (None when in memory only).
    """

    features: np.ndarray
    labels: np.ndarray | None
    cache_path: str | None = None

    def __iter__(self):
        return iter((self.features, self.labels))

    def __len__(self):
        return len(self.features)


def _extractor(model_or_base):
    """image -> feature vector model."""
    if not isinstance(model_or_base, keras.Model):
        raise TypeError("extract_features: expected a keras.Model (a tlkeras transfer model or "
                        f"a base), received {type(model_or_base).__name__}.")
    if anatomy.is_transfer_model(model_or_base):
        # The image -> "features" half of tlkeras.split_model, built without the head half
        # (making a head calls the head layers again, which split_model cannot do twice).
        return anatomy.feature_extractor(model_or_base)
    inputs = keras.Input(tuple(model_or_base.inputs[0].shape[1:]), name="image")
    x = model_or_base(inputs, training=False)
    if len(x.shape) == 4:  # a base without pooling: average-pool it
        x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, x, name=f"{model_or_base.name}_features")


def _cache_key(extractor, dataset, key):
    file_paths = getattr(dataset, "file_paths", None)
    if file_paths is None and key is None:
        raise ValueError(
            "extract_features(cache_dir=...) needs to know which data it caches: pass a dataset "
            "with a `file_paths` attribute (tlkeras.data.from_directory / from_csv) or key='...' "
            "naming the data (change it whenever the data change).")
    h = hashlib.sha256()
    h.update(json.dumps({
        "model": extractor.name,
        "input_shape": [list(map(str, i.shape)) for i in extractor.inputs],
        "weights": [(w.path, list(w.shape)) for w in extractor.weights],
        "element_spec": str(dataset.element_spec),
        "file_paths": list(file_paths) if file_paths is not None else None,
        "key": key,
    }, default=str).encode())
    for w in extractor.weights:  # the weights fingerprint
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    _fingerprint_data(h, dataset, file_paths)
    return h.hexdigest()[:32]


def _fingerprint_data(h, dataset, file_paths):
    """The data's identity beyond names: each file's size, time and head; labels; length."""
    for path in file_paths or ():
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                h.update(f"{st.st_size}|{st.st_mtime_ns}|".encode() + f.read(4096))
        except OSError:
            h.update(b"missing")
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        h.update(np.ascontiguousarray(labels).tobytes())
    h.update(str(int(dataset.cardinality())).encode())


def extract_features(model_or_base, dataset, *, cache_dir=None, key=None, verbose=1):
    """Runs the feature extractor once over ``dataset`` and keeps its outputs.

    Args:
        model_or_base: a model built by ``tlkeras.build_transfer_model`` (its
            image -> "features" part from ``tlkeras.split_model`` is used), or
            any ``keras.Model`` mapping images to vectors (4D outputs are
            average-pooled).
        dataset: ``tf.data.Dataset`` of ``(images, labels)`` batches (or
            images only), e.g. from ``tlkeras.data``. Use it without
            augmentation: the features are computed once.
        cache_dir: if given, features are saved to / loaded from
            ``<cache_dir>/<key>.npz``, keyed by the extractor's architecture,
            a hash of its weights, the input size, the element spec and the
            exact ``dataset.file_paths`` (or ``key``): a changed base, size or
            file list computes them again.
        key: extra string identifying the data; required with ``cache_dir``
            when the dataset has no ``file_paths``.
        verbose: 1 shows a progress bar, 0 is silent.

    Returns:
        A :class:`FeatureSet` (``features, labels = ...`` works). Labels are
        stacked as the dataset yields them; features are float32 ``(N, D)``.

    Example:

    >>> import keras, numpy as np, tensorflow as tf
    >>> images = np.random.default_rng(0).uniform(0, 255, (12, 8, 8, 3)).astype("float32")
    >>> train_ds = tf.data.Dataset.from_tensor_slices((images, np.arange(12) % 2)).batch(4)
    >>> base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(5, 3)])
    >>> feats, labels = extract_features(base, train_ds, verbose=0)  # 4D: average-pooled
    >>> feats.shape, labels.shape
    ((12, 5), (12,))
    """
    extractor = _extractor(model_or_base)
    path = None
    if cache_dir is not None:
        path = _path(extractor, dataset, cache_dir, key)
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as f:
                labels = f["labels"] if "labels" in f.files else None
                out = FeatureSet(f["features"], labels, path)
            logger.info("Loaded %d cached features from %s", len(out), path)
            return out

    spec = dataset.element_spec
    spec = spec[0] if isinstance(spec, tuple) else spec
    step = tf.function(  # one trace for every batch size, the last partial batch included
        lambda x: tf.cast(extractor(x, training=False), tf.float32),
        input_signature=[tf.TensorSpec((None, *spec.shape[1:]), spec.dtype)])
    steps = int(dataset.cardinality())
    bar = keras.utils.Progbar(steps if steps > 0 else None, verbose=verbose,
                              unit_name="batch")
    feats, labels = [], []
    for i, batch in enumerate(dataset):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        feats.append(step(x))  # no per-batch sync: numpy() once at the end
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            labels.append(np.asarray(batch[1]))
        bar.update(i + 1)
    if not feats:
        raise ValueError("extract_features: the dataset is empty.")
    return save(FeatureSet(tf.concat(feats, 0).numpy(),
                           np.concatenate(labels) if labels else None, path))


def cache_path(model_or_base, dataset, cache_dir, key=None):
    """Where `extract_features(model_or_base, dataset, cache_dir=..., key=...)` keeps its file."""
    return _path(_extractor(model_or_base), dataset, cache_dir, key)


def _path(extractor, dataset, cache_dir, key):
    return os.path.join(os.fspath(cache_dir), _cache_key(extractor, dataset, key) + ".npz")


def save(feature_set):
    """Writes `feature_set` to its `cache_path` (atomically) when it has one; returns it."""
    path = feature_set.cache_path
    if path:
        arrays = {"features": feature_set.features}
        if feature_set.labels is not None:
            arrays["labels"] = feature_set.labels
        with atomic.path(path) as tmp:
            np.savez(tmp, **arrays)
        logger.info("Saved %d features to %s", len(feature_set), path)
    return feature_set


def features_dataset(features, labels=None, *, batch_size=32, shuffle=True, seed=None):
    """A batched ``tf.data.Dataset`` of ``(features, labels)`` for the head model.

    ``features`` is a :class:`FeatureSet` or an array (then pass ``labels``).
    Train the ``head`` from ``tlkeras.split_model(model)`` on it.

    Example:

    >>> import keras, numpy as np, tensorflow as tf
    >>> images = np.random.default_rng(0).uniform(0, 255, (12, 8, 8, 3)).astype("float32")
    >>> train_ds = tf.data.Dataset.from_tensor_slices((images, np.arange(12) % 2)).batch(4)
    >>> base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(5, 3)])
    >>> ds = features_dataset(extract_features(base, train_ds, verbose=0), batch_size=6, seed=0)
    >>> [tuple(x.shape) for x, y in ds]
    [(6, 5), (6, 5)]
    """
    if isinstance(features, FeatureSet):
        features, labels = features.features, features.labels if labels is None else labels
    elems = features if labels is None else (features, labels)
    ds = tf.data.Dataset.from_tensor_slices(elems)
    if shuffle:
        ds = ds.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fit_sklearn(estimator, model_or_base, dataset, *, cache_dir=None, key=None, verbose=0):
    """Fits a scikit-learn estimator (``LogisticRegression``, ``SVC``, ...) on features.

    Extracts features of ``dataset`` with :func:`extract_features` and calls
    ``estimator.fit(features, labels)`` (one-hot labels become class ids).
    Returns the fitted estimator; predict with features of new data.

    Example:

    >>> import keras, numpy as np, tensorflow as tf
    >>> images = np.random.default_rng(0).uniform(0, 255, (12, 8, 8, 3)).astype("float32")
    >>> train_ds = tf.data.Dataset.from_tensor_slices((images, np.arange(12) % 2)).batch(4)
    >>> base = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(5, 3)])
    >>> from sklearn.svm import SVC
    >>> svm = fit_sklearn(SVC(), base, train_ds)
    >>> test = extract_features(base, train_ds, verbose=0)
    >>> 0 <= svm.score(test.features, sklearn_labels(test.labels)) <= 1
    True
    """
    fs = extract_features(model_or_base, dataset, cache_dir=cache_dir, key=key, verbose=verbose)
    if fs.labels is None:
        raise ValueError("fit_sklearn needs a dataset of (images, labels).")
    return estimator.fit(fs.features, sklearn_labels(fs.labels))


def sklearn_labels(labels):
    """Labels as scikit-learn wants them: one-hot -> class ids, (N, 1) -> (N,)."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1 and set(np.unique(labels)) <= {0, 1}:
        if (labels.sum(axis=1) == 1).all():
            return labels.argmax(axis=1)
        return labels  # multi-hot: for multi-output estimators
    return labels.reshape(len(labels))
