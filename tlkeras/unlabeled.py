"""Learning from the target domain's unlabeled images.

Four tools for the common case of a pretrained base, a few labels and many
unlabeled images from your own domain:

- `pretrain`: SimCLR contrastive training of the base on unlabeled images
  (two augmented views, a projection head, NT-Xent; the head is dropped),
  starting from its pretrained weights. Fine-tune the adapted base as usual.
- `adapt`: unsupervised domain adaptation of a trained transfer model toward
  unlabeled target images: CORAL (align feature covariances; runs on cached
  features) or DANN (a domain classifier through a `GradientReversal` layer).
- `cluster`: k-means on pretrained features (the number of clusters chosen by
  silhouette when not given); purity and NMI when labels are given.
- `similar`: nearest neighbours on L2-normalized features, with an index that
  saves and reloads; recall@k when labels are given.

Example:

>>> import numpy as np, tlkeras
>>> from tlkeras.demo import small_cnn
>>> base = small_cnn()
>>> images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype="uint8")
>>> tlkeras.cluster(base, images, n_clusters=3).labels.shape
(40,)
>>> tlkeras.similar(base, images, images[:5], k=2).indices.shape
(5, 2)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tlkeras import models
from tlkeras import callbacks as tb
from tlkeras import training
from tlkeras.features import extract_features, sklearn_labels

logger = logging.getLogger("tlkeras")

__all__ = [
    "AdaptResult", "ClusterResult", "GradientReversal", "NeighborIndex", "PretrainResult",
    "SimilarResult", "adapt", "cluster", "coral_transform", "pretrain", "similar",
    "simclr_augmentation",
]


# ------------------------------------------------------------------ features


def _as_dataset(data, batch_size=64):
    """A dataset of image batches (or `(images, labels)` batches) from an array or a dataset."""
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return tf.data.Dataset.from_tensor_slices((np.asarray(data[0]),
                                                   np.asarray(data[1]))).batch(batch_size)
    array = np.asarray(data)
    if array.ndim != 4:
        raise ValueError("Expected images as a (N, height, width, 3) array, an (images, labels) "
                         f"pair or a tf.data.Dataset; received an array of shape {array.shape}.")
    return tf.data.Dataset.from_tensor_slices(array).batch(batch_size)


def _features(base_or_model, data, verbose=0):
    """`(features, labels or None)` of `data`: a transfer model's "features", or a base's output."""
    feature_set = extract_features(base_or_model, _as_dataset(data), verbose=verbose)
    labels = None if feature_set.labels is None else sklearn_labels(feature_set.labels)
    return feature_set.features, labels


def _normalize(features):
    features = np.asarray(features, "float32")
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------ cluster


@dataclasses.dataclass
class ClusterResult:
    """`cluster`'s output: one cluster id per image, and how well they match labels if given."""

    labels: np.ndarray
    n_clusters: int
    silhouette: float
    silhouette_by_k: dict
    purity: float | None = None
    nmi: float | None = None
    estimator: object = None


def cluster(base_or_model, images, n_clusters=None, labels=None, *, max_clusters=15, seed=0,
            verbose=0):
    """Clusters images by k-means on the (L2-normalized) features of a pretrained base.

    Args:
        base_or_model: a `build_transfer_model` model (its "features") or a base
            `keras.Model` (fed the images as given; 4D outputs are average-pooled).
        images: `(N, H, W, 3)` array, or a `tf.data.Dataset` of image batches
            (or `(images, labels)` batches: the labels are then used as `labels`).
        n_clusters: number of clusters; `None` picks the k in 2..`max_clusters`
            with the best silhouette score.
        labels: true classes (optional), only to score the clusters: purity and
            normalized mutual information (NMI).
        max_clusters: largest k tried when `n_clusters` is None.
        seed: k-means seed.
        verbose: 1 shows feature-extraction progress.

    Returns:
        A `ClusterResult` (`.labels`, `.n_clusters`, `.silhouette`, `.purity`, `.nmi`).

    Example:

    >>> import numpy as np
    >>> from tlkeras.demo import small_cnn
    >>> images = np.random.default_rng(0).integers(0, 256, (30, 16, 16, 3), dtype="uint8")
    >>> result = cluster(small_cnn(), images, labels=np.arange(30) % 3)
    >>> 2 <= result.n_clusters <= 15 and 0.0 <= result.nmi <= 1.0
    True
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score, silhouette_score

    features, found = _features(base_or_model, images, verbose)
    labels = found if labels is None else sklearn_labels(labels)
    features = _normalize(features)
    n = len(features)
    if labels is not None and len(labels) != n:
        raise ValueError(f"cluster: expected {n} labels (one per image), received {len(labels)}.")
    if n_clusters is None:
        candidates = range(2, max(2, min(max_clusters, n - 1)) + 1)
    elif not isinstance(n_clusters, int) or not 1 <= n_clusters <= n:
        raise ValueError(f"cluster: expected n_clusters an int in [1, {n}] (the number of "
                         f"images) or None, received n_clusters={n_clusters!r}.")
    else:
        candidates = [n_clusters]
    fits, scores = {}, {}
    for k in candidates:
        fits[k] = KMeans(k, n_init=4, random_state=seed).fit(features)
        if 1 < k < n:
            scores[k] = float(silhouette_score(features, fits[k].labels_, random_state=seed,
                                               sample_size=min(n, 2000)))
    best = max(scores, key=scores.get) if n_clusters is None else n_clusters
    result = ClusterResult(fits[best].labels_.astype("int32"), best, scores.get(best, math.nan),
                           scores, estimator=fits[best])
    if labels is not None:
        result.nmi = float(normalized_mutual_info_score(labels, result.labels))
        result.purity = _purity(labels, result.labels)
    return result


def _purity(labels, clusters):
    """The fraction of images whose cluster's majority class is their class."""
    total = 0
    for c in np.unique(clusters):
        total += np.bincount(np.unique(labels, return_inverse=True)[1][clusters == c]).max()
    return float(total / len(labels))


# ------------------------------------------------------------------ similar


@dataclasses.dataclass
class NeighborIndex:
    """L2-normalized features of the index images (and their labels), saved as one `.npz`."""

    features: np.ndarray
    labels: np.ndarray | None = None

    def save(self, path):
        """Writes the index to `path` (a `.npz` file); returns the path."""
        path = os.fspath(path)
        arrays = {"features": self.features}
        if self.labels is not None:
            arrays["labels"] = self.labels
        np.savez(path, **arrays)
        return path if path.endswith(".npz") else path + ".npz"

    @classmethod
    def load(cls, path):
        """Reads an index written by `save`."""
        with np.load(os.fspath(path), allow_pickle=False) as f:
            if "features" not in f.files:
                raise ValueError(f"{path}: not a tlkeras neighbour index (no 'features' array).")
            return cls(f["features"], f["labels"] if "labels" in f.files else None)

    def search(self, query_features, k=10):
        """`(indices, similarities)` of the `k` nearest index entries (cosine) per query."""
        from sklearn.neighbors import NearestNeighbors

        if not 1 <= k <= len(self.features):
            raise ValueError(f"similar: expected k in [1, {len(self.features)}] (the index size), "
                             f"received k={k}.")
        nn = NearestNeighbors(n_neighbors=k).fit(self.features)
        distances, indices = nn.kneighbors(_normalize(query_features))
        return indices, 1.0 - distances ** 2 / 2.0  # unit vectors: |a-b|^2 = 2 - 2 cos


@dataclasses.dataclass
class SimilarResult:
    """`similar`'s output: `(queries, k)` neighbour indices, their cosine similarity, recall@k."""

    indices: np.ndarray
    similarities: np.ndarray
    index: NeighborIndex
    recall_at_k: float | None = None


def similar(base_or_model, index_images, query_images, k=10, *, index_labels=None,
            query_labels=None, index_path=None, verbose=0):
    """Finds the `k` most similar index images of each query image (cosine on features).

    Args:
        base_or_model: a `build_transfer_model` model or a base `keras.Model`.
        index_images: the searchable images (array or dataset, as `cluster`
            takes), or a `NeighborIndex` / a path to a saved one.
        query_images: the query images.
        k: neighbours per query.
        index_labels, query_labels: classes (optional; datasets of
            `(images, labels)` give them); with both, recall@k is reported: the
            fraction of queries with at least one same-class image among their k.
        index_path: if given, the index is saved there (`.npz`).
        verbose: 1 shows feature-extraction progress.

    Returns:
        A `SimilarResult` (`.indices` of shape `(queries, k)`, `.similarities`,
        `.index`, `.recall_at_k`).

    Example:

    >>> import numpy as np
    >>> from tlkeras.demo import small_cnn
    >>> images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype="uint8")
    >>> result = similar(small_cnn(), images, images[:3], k=1)
    >>> result.indices[:, 0].tolist()  # each image is its own nearest neighbour
    [0, 1, 2]
    """
    if isinstance(index_images, (str, os.PathLike)):
        index_images = NeighborIndex.load(index_images)
    if isinstance(index_images, NeighborIndex):
        index = index_images
    else:
        features, found = _features(base_or_model, index_images, verbose)
        labels = found if index_labels is None else sklearn_labels(index_labels)
        index = NeighborIndex(_normalize(features), labels)
    if index_path is not None:
        index.save(index_path)
    queries, found = _features(base_or_model, query_images, verbose)
    if queries.shape[1] != index.features.shape[1]:
        raise ValueError(f"similar: the index holds {index.features.shape[1]}-dim features but "
                         f"the model gives {queries.shape[1]}-dim ones; build the index with the "
                         "same model.")
    indices, similarities = index.search(queries, k)
    result = SimilarResult(indices, similarities, index)
    query_labels = found if query_labels is None else sklearn_labels(query_labels)
    if index.labels is not None and query_labels is not None:
        hits = index.labels[indices] == np.asarray(query_labels)[:, None]
        result.recall_at_k = float(hits.any(axis=1).mean())
    return result


# ------------------------------------------------------------------ pretrain


def simclr_augmentation(input_shape, *, flip=False, seed=None, name="simclr_augmentation"):
    """The random views SimCLR compares: crop-and-resize, small rotation, colour jitter.

    As the keras.io SimCLR example (random translation + zoom standing in for
    random resized crops, random brightness and contrast); `flip=True` adds
    horizontal flips (off by default: many domains, such as digits or text, are
    not mirror-symmetric). Works on [0, 255] images.
    """
    L = keras.layers
    layers = [keras.Input(tuple(input_shape))]
    if flip:
        layers.append(L.RandomFlip("horizontal", seed=seed))
    layers += [
        L.RandomTranslation(0.15, 0.15, seed=seed),
        L.RandomZoom((-0.3, 0.1), seed=seed),
        L.RandomRotation(0.04, seed=seed),
        L.RandomContrast(0.5, value_range=(0, 255), seed=seed),
        L.RandomBrightness(0.3, value_range=(0, 255), seed=seed),
    ]
    return keras.Sequential(layers, name=name)


class _SimCLR(keras.Model):
    """Encoder + projection head trained with NT-Xent on two augmented views (not saved)."""

    def __init__(self, encoder, augmentation, projection_units, temperature):
        super().__init__(name="simclr")
        self.encoder, self.augmentation, self.temperature = encoder, augmentation, temperature
        width = encoder.output_shape[-1]
        self.projection_head = keras.Sequential(
            [keras.Input((width,)), keras.layers.Dense(projection_units, activation="relu"),
             keras.layers.Dense(projection_units)], name="projection_head")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="contrastive_accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def call(self, images):
        return self.projection_head(self.encoder(images, training=False))

    def nt_xent(self, z1, z2):
        """NT-Xent over the 2N views of a batch: each view's positive is its other view."""
        z = ops.normalize(ops.concatenate([z1, z2], 0), axis=-1)
        n = ops.shape(z1)[0]
        logits = ops.matmul(z, ops.transpose(z)) / self.temperature
        logits = logits - 1e9 * ops.eye(2 * n)  # a view is not its own negative
        targets = ops.concatenate([ops.arange(n) + n, ops.arange(n)], 0)
        loss = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        return ops.mean(loss), targets, logits

    def train_step(self, images):
        if isinstance(images, (tuple, list)):
            images = images[0]
        view1 = self.augmentation(images, training=True)
        view2 = self.augmentation(images, training=True)
        with tf.GradientTape() as tape:
            z1 = self.projection_head(self.encoder(view1, training=False), training=True)
            z2 = self.projection_head(self.encoder(view2, training=False), training=True)
            loss, targets, logits = self.nt_xent(ops.cast(z1, "float32"), ops.cast(z2, "float32"))
            scaled = self.optimizer.scale_loss(loss)  # loss scaling under mixed_float16
        variables = self.encoder.trainable_weights + self.projection_head.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(targets, logits)
        return {m.name: m.result() for m in self.metrics}


@dataclasses.dataclass
class PretrainResult:
    """`pretrain`'s output: the adapted base or model (the object given, trained in place)."""

    model: keras.Model
    history: dict
    run_dir: str | None = None
    paths: dict = dataclasses.field(default_factory=dict)


def _encoder(base_or_model):
    """`(encoder, base)`: image -> feature vector, and the base whose weights it trains."""
    names = {layer.name for layer in base_or_model.layers}
    if "features" in names and "predictions" in names:
        features = base_or_model.get_layer("features").output
        encoder = keras.Model(base_or_model.inputs, features, name="encoder")
        return encoder, models.get_base(base_or_model)
    inputs = keras.Input(tuple(base_or_model.inputs[0].shape[1:]), name="image")
    x = base_or_model(inputs, training=False)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, x, name="encoder"), base_or_model


def pretrain(base_or_model, unlabeled_data, *, method="simclr", epochs=10, batch_size=64,
             learning_rate=1e-3, temperature=0.1, projection_units=128, augmentation=None,
             run_dir=None, precision="auto", strategy=None, seed=None, verbose=1):
    """Continues training a pretrained base on unlabeled images with SimCLR.

    Two random views of each image (`augmentation`) go through the base and a
    new projection head; NT-Xent pulls the two views of an image together and
    pushes the other images of the batch away (Chen et al. 2020; the keras.io
    "Semi-supervised image classification using contrastive pretraining with
    SimCLR" example). Training starts from the base's current (pretrained)
    weights; the projection head is dropped afterwards. BatchNormalization
    stays in inference mode with its statistics frozen, as everywhere in
    tlkeras. Then `build_transfer_model` / `fine_tune` use the adapted base.

    Args:
        base_or_model: a base `keras.Model` (fed the images as given, as
            `build_transfer_model(base)` does), or a `build_transfer_model`
            model (its base is adapted, its head untouched). Trained in place:
            same architecture, same input contract.
        unlabeled_data: `(N, H, W, 3)` images in [0, 255], or a
            `tf.data.Dataset` of image batches (labels, if any, are ignored).
        method: `"simclr"`.
        epochs: passes over `unlabeled_data`.
        batch_size: batch size for an array (the negatives per view: 2 x batch - 2).
        learning_rate: Adam learning rate.
        temperature: NT-Xent temperature.
        projection_units: width of the projection head.
        augmentation: a layer making random views; default `simclr_augmentation`.
        run_dir: the run folder: `config.json`, `history.csv`, TensorBoard
            `logs/`, resume state under `backup/` (started again with the same
            folder, a killed run resumes) and `model.keras` (the adapted object).
        precision: as in `fine_tune`: `"auto"` (mixed_float16 on NVIDIA GPUs
            of compute capability >= 7.0, else float32), `"float32"`,
            `"mixed_float16"` or `"mixed_bfloat16"`. NT-Xent is computed in float32; the model
            returned keeps its float32 variables, and the global policy is
            restored afterwards.
        strategy: as in `fine_tune`: `None`/`"auto"`, `"mirrored"`,
            `"multiworker"` or a `tf.distribute.Strategy`. The negatives of a
            view are the other images of its replica's batch.
        seed: random seed.
        verbose: Keras progress output.

    Returns:
        A `PretrainResult` (`.model` is `base_or_model`, adapted; `.history`).

    Example:

    >>> import numpy as np
    >>> from tlkeras.demo import small_cnn
    >>> base = small_cnn()
    >>> images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype="uint8")
    >>> result = pretrain(base, images, epochs=1, batch_size=16, verbose=0)
    >>> result.model is base
    True
    """
    if method != "simclr":
        raise ValueError(f"pretrain: expected method='simclr', received method={method!r}.")
    if not isinstance(base_or_model, keras.Model):
        raise TypeError("pretrain: expected a keras.Model (a base or a tlkeras transfer model), "
                        f"received {type(base_or_model).__name__}.")
    if precision not in training.PRECISIONS:
        raise ValueError(f"pretrain: expected precision in {training.PRECISIONS}, "
                         f"received precision={precision!r}.")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if isinstance(unlabeled_data, tf.data.Dataset):
        data = unlabeled_data.map(lambda *batch: batch[0])
    else:
        images = np.asarray(unlabeled_data)
        if images.ndim != 4:
            raise ValueError("pretrain: expected unlabeled_data as (N, height, width, 3) images "
                             f"or a tf.data.Dataset, received an array of shape {images.shape}.")
        if len(images) < 2:
            raise ValueError("pretrain: SimCLR needs at least 2 images (the other images of a "
                             f"batch are the negatives), received {len(images)}.")
        data = (tf.data.Dataset.from_tensor_slices(images)
                .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
                .batch(batch_size, drop_remainder=len(images) >= batch_size)
                .prefetch(tf.data.AUTOTUNE))
    policy = training.resolve_precision(precision)
    config = {"method": method, "epochs": epochs, "batch_size": batch_size,
              "learning_rate": learning_rate, "temperature": temperature,
              "projection_units": projection_units, "precision": policy,
              "strategy": strategy if strategy is None or isinstance(strategy, str)
              else type(strategy).__name__, "seed": seed, "model": base_or_model.name}
    strategy = training.resolve_strategy(strategy)
    callbacks, paths = [], {}
    if run_dir:
        run_dir = os.path.abspath(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)
        paths = {name: os.path.join(run_dir, name)
                 for name in ("config.json", "history.csv", "logs", "model.keras")}
        callbacks = [keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup"),
                                                      delete_checkpoint=False),
                     keras.callbacks.CSVLogger(paths["history.csv"], append=True),
                     *tb.tensorboard_callbacks(paths["logs"], hparams=config)]
    previous_policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy(policy)
        working = training._prepare(base_or_model, policy, strategy)  # itself when nothing changes
        with strategy.scope():
            history = _fit_simclr(working, data, augmentation, epochs, learning_rate,
                                  temperature, projection_units, callbacks, seed, verbose)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    if working is not base_or_model:
        training._copy_weights(working, base_or_model)  # float32 variables, as given
    if run_dir:
        base_or_model.save(paths["model.keras"])
    return PretrainResult(base_or_model, dict(history.history), run_dir, paths)


def _fit_simclr(base_or_model, data, augmentation, epochs, learning_rate, temperature,
                projection_units, callbacks, seed, verbose):
    """Trains `base_or_model`'s base with SimCLR (its trainable flags kept); the history."""
    encoder, base = _encoder(base_or_model)
    if augmentation is None:
        augmentation = simclr_augmentation(encoder.input_shape[1:], seed=seed)
    trainable = {id(layer): layer.trainable for layer in base._flatten_layers()}
    models.set_trainable_depth(base, "all")  # BatchNormalization stays frozen
    try:
        simclr = _SimCLR(encoder, augmentation, projection_units, temperature)
        simclr.compile(keras.optimizers.Adam(learning_rate))
        simclr(np.zeros((1, *encoder.input_shape[1:]), "float32"))  # built, for BackupAndRestore
        return simclr.fit(data, epochs=epochs, callbacks=callbacks, shuffle=False,
                          verbose=verbose)
    finally:
        for layer in base._flatten_layers():
            layer.trainable = trainable.get(id(layer), layer.trainable)


# ------------------------------------------------------------------ adapt


@tf.custom_gradient
def _reverse(x, factor):
    def grad(upstream):
        return -factor * upstream, tf.zeros_like(factor)

    return tf.identity(x), grad


@keras.saving.register_keras_serializable(package="tlkeras")
class GradientReversal(keras.layers.Layer):
    """Identity forward; multiplies the gradient by `-factor` backward (Ganin et al. 2016).

    `factor` is a non-trainable variable, so a schedule can change it during
    training (`adapt(method="dann")` ramps it from 0 to `factor`).

    Example:

    >>> import tensorflow as tf
    >>> layer = GradientReversal(0.5)
    >>> x = tf.constant([1.0, 2.0])
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = tf.reduce_sum(layer(x) * 3.0)
    >>> tape.gradient(y, x).numpy().tolist()
    [-1.5, -1.5]
    """

    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_factor = float(factor)
        self.factor = self.add_weight(shape=(), initializer=keras.initializers.Constant(factor),
                                      trainable=False, name="factor")

    def call(self, inputs):
        return _reverse(inputs, ops.cast(self.factor, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": self.initial_factor}


@dataclasses.dataclass
class AdaptResult:
    """`adapt`'s output: the adapted model (the one given, adapted in place) and measurements."""

    model: keras.Model
    method: str
    history: dict
    selected_by: str
    covariance_gap_before: float | None = None
    covariance_gap_after: float | None = None
    best_epoch: int | None = None


def _covariance(features):
    centered = features - features.mean(0, keepdims=True)
    return centered.T @ centered / max(len(features) - 1, 1)


def _matrix_power(matrix, power):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.maximum(values, 1e-12) ** power) @ vectors.T


def covariance_gap(a, b):
    """CORAL's loss: squared Frobenius distance of the feature covariances, over 4 d^2."""
    d = a.shape[1]
    return float(np.sum((_covariance(a) - _covariance(b)) ** 2) / (4 * d * d))


def coral_transform(source_features, target_features, eps=0.01, apply_to=None):
    """CORAL (Sun, Feng and Saenko 2016): source features recoloured with the target's statistics.

    Whitens the source features with their own covariance, then colours them
    with the target's and moves them to the target mean. Each covariance gets
    `eps` times its mean variance added on the diagonal (the paper's identity,
    scaled to the features' size). Train a classifier on the result and apply it to target features.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> source, target = rng.normal(size=(200, 4)), 3 * rng.normal(size=(200, 4)) + 1
    >>> moved = coral_transform(source, target)
    >>> covariance_gap(moved, target) < covariance_gap(source, target)
    True
    """
    source = np.asarray(source_features, "float64")
    target = np.asarray(target_features, "float64")

    def regularized(features):
        cov = _covariance(features)
        return cov + eps * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))

    whiten = _matrix_power(regularized(source), -0.5)
    colour = _matrix_power(regularized(target), 0.5)
    points = source if apply_to is None else np.asarray(apply_to, "float64")
    moved = (points - source.mean(0)) @ whiten @ colour + target.mean(0)
    return moved.astype("float32")


def _split_labeled(dataset, what):
    spec = dataset.element_spec
    if not (isinstance(spec, tuple) and len(spec) >= 2):
        raise ValueError(f"adapt: expected {what} as a dataset of (images, labels) batches, "
                         f"received element_spec {spec}.")


def _images_only(data):
    """Target data as a dataset of image batches; labels, if present, are dropped here."""
    data = _as_dataset(data)
    spec = data.element_spec
    if isinstance(spec, tuple):
        logger.info("adapt: target_data holds labels; they are dropped (adaptation is "
                    "unsupervised).")
        data = data.map(lambda *batch: batch[0])
    return data


def _score(model, data):
    """Accuracy of `model` on a labeled dataset (any task: argmax or > 0.5)."""
    correct = total = 0
    for x, y, *_ in data:
        p = model(x, training=False).numpy()
        y = np.asarray(y)
        if p.shape[-1] == 1:
            hits = (p[:, 0] > 0.5) == (y.reshape(-1) > 0.5)
        else:
            hits = p.argmax(-1) == sklearn_labels(y).reshape(-1)
        correct, total = correct + hits.sum(), total + len(hits)
    return float(correct / max(total, 1))


def adapt(model, source_data, target_data, *, method="coral", epochs=10, learning_rate=None,
          target_validation_data=None, source_validation_data=None, domain_weight=1.0,
          domain_units=64, eps=0.01, seed=None, verbose=1):
    """Adapts a transfer model trained on labeled source data toward unlabeled target data.

    - `"coral"`: extracts the (frozen) features of source and target once,
      recolours the source features with the target's covariance and mean
      (`coral_transform`) and retrains the head on them. Cheap: the base runs
      once per image.
    - `"dann"`: adds a domain classifier (source vs target) on the "features"
      through a `GradientReversal` layer, and trains the base and head on
      the source labels while the reversed domain gradient makes the features
      indistinguishable between domains. The reversal factor ramps from 0 to
      `domain_weight` (Ganin et al.'s schedule). BatchNormalization stays frozen.

    Target labels are never used for training. `target_validation_data`
    (a few labeled target images) only picks the best epoch; without it the
    source validation (or the source training loss) picks it, which may not
    track target accuracy: a warning says so.

    Args:
        model: a model from `build_transfer_model` already trained on the source
            (adapted in place; the result's `.model` is it).
        source_data: `tf.data.Dataset` of labeled `(images, labels)` batches.
        target_data: target images: a dataset of image batches, or an array.
        method: `"coral"` or `"dann"`.
        epochs: head epochs (coral) or adaptation epochs (dann).
        learning_rate: default 1e-3 (coral, the head) or 1e-4 (dann, the whole model).
        target_validation_data, source_validation_data: labeled datasets.
        domain_weight: the final gradient-reversal factor (dann).
        domain_units: hidden width of the domain classifier (dann).
        eps: diagonal regularization of both covariances, relative to their
            mean variance (coral).
        seed: random seed.
        verbose: Keras progress output.

    Returns:
        An `AdaptResult` (`.model`, `.history`, `.selected_by`, covariance gaps
        of the features before and after, `.best_epoch`).
    """
    if method not in ("coral", "dann"):
        raise ValueError(f"adapt: expected method in ('coral', 'dann'), received "
                         f"method={method!r}.")
    if not isinstance(source_data, tf.data.Dataset):
        source_data = _as_dataset(source_data)
    _split_labeled(source_data, "source_data")
    target_data = _images_only(target_data)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if target_validation_data is not None:
        val, selected_by = target_validation_data, "target_validation"
    else:
        val = source_validation_data
        selected_by = "source_validation" if val is not None else "source_training_loss"
        logger.warning("adapt: no labeled target validation data; picking the checkpoint by %s, "
                       "which may not track target accuracy.", selected_by.replace("_", " "))
    run = _coral if method == "coral" else _dann
    return run(model, source_data, target_data, val, selected_by, epochs=epochs,
               learning_rate=learning_rate, domain_weight=domain_weight,
               domain_units=domain_units, eps=eps, verbose=verbose)


class _PickBest(keras.callbacks.Callback):
    """Keeps the weights of `model` at the epoch with the best `score()` (else the lowest loss)."""

    def __init__(self, model, score=None):
        super().__init__()
        self.full_model, self.score = model, score
        self.best, self.weights, self.best_epoch = -math.inf, None, None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.score is not None:
            value = logs["selection_accuracy"] = self.score()
        else:
            value = -float(logs.get("loss", 0.0))
        if value >= self.best:
            self.best, self.best_epoch = value, epoch
            self.weights = self.full_model.get_weights()

    def restore(self):
        if self.weights is not None:
            self.full_model.set_weights(self.weights)


def _coral(model, source, target, val, selected_by, *, epochs, learning_rate, eps, verbose, **_):
    xs, ys = extract_features(model, source, verbose=verbose)
    xt = extract_features(model, target, verbose=verbose).features
    moved = coral_transform(xs, xt, eps=eps)
    before, after = covariance_gap(xs, xt), covariance_gap(moved, xt)
    _, head = models.split_model(model)
    loss, metrics = training.loss_and_metrics(models.infer_task(model))
    head.compile(keras.optimizers.Adam(learning_rate or 1e-3), loss, metrics=metrics)
    score = None
    if selected_by == "target_validation":
        score = functools.partial(_score, model, val)
    elif selected_by == "source_validation":
        # The head learns source features moved to the target's statistics: score it on
        # source validation features moved the same way.
        fv, yv = extract_features(model, val, verbose=0)
        moved_val = tf.data.Dataset.from_tensor_slices(
            (coral_transform(xs, xt, eps=eps, apply_to=fv), yv)).batch(256)
        score = functools.partial(_score, head, moved_val)
    pick = _PickBest(model, score)
    batch = training._batch_size(source)
    history = head.fit(moved, ys, batch_size=batch, epochs=epochs, callbacks=[pick],
                       verbose=verbose)
    pick.restore()
    return AdaptResult(model, "coral", dict(history.history), selected_by, before, after,
                       pick.best_epoch)


class _RampReversal(keras.callbacks.Callback):
    """Ganin et al.'s schedule: factor = w * (2 / (1 + exp(-10 p)) - 1), p the training progress."""

    def __init__(self, layer, weight, total_steps):
        super().__init__()
        self.layer, self.weight, self.total, self.step = layer, weight, max(total_steps, 1), 0

    def on_train_batch_begin(self, batch, logs=None):
        p = self.step / self.total
        self.layer.factor.assign(self.weight * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0))
        self.step += 1


def _dann(model, source, target, val, selected_by, *, epochs, learning_rate, domain_weight,
          domain_units, verbose, **_):
    task = models.infer_task(model)
    features = model.get_layer("features").output
    reversal = GradientReversal(0.0, name="gradient_reversal")
    x = keras.layers.Dense(domain_units, activation="relu", name="domain_dense")(reversal(features))
    domain = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="domain")(x)
    dann = keras.Model(model.inputs, {"predictions": model.output, "domain": domain}, name="dann")
    trainable = {id(layer): layer.trainable for layer in model._flatten_layers()}
    models.unfreeze(model, "all")
    loss, metrics = training.loss_and_metrics(task)
    dann.compile(keras.optimizers.Adam(learning_rate or 1e-4),
                 loss={"predictions": loss, "domain": "binary_crossentropy"},
                 metrics={"predictions": metrics, "domain": ["binary_accuracy"]})

    def joined(source_batch, target_images):
        xs, ys = source_batch[0], source_batch[1]
        ns, nt = tf.shape(xs)[0], tf.shape(target_images)[0]
        images = tf.concat([tf.cast(xs, tf.float32), tf.cast(target_images, tf.float32)], 0)
        # Target rows get a placeholder label with weight 0: no target label exists or is used.
        placeholder = tf.zeros(tf.concat([[nt], tf.shape(ys)[1:]], 0), ys.dtype)
        labels = {"predictions": tf.concat([ys, placeholder], 0),
                  "domain": tf.concat([tf.zeros([ns, 1]), tf.ones([nt, 1])], 0)}
        weights = {"predictions": tf.concat([tf.ones([ns]), tf.zeros([nt])], 0),
                   "domain": tf.ones([ns + nt])}
        return images, labels, weights

    steps = training._steps_per_epoch(source)
    data = tf.data.Dataset.zip(source.repeat(), target.repeat()).map(joined).take(steps)
    pick = _PickBest(model, None if val is None else functools.partial(_score, model, val))
    try:
        history = dann.fit(data.prefetch(tf.data.AUTOTUNE), epochs=epochs, verbose=verbose,
                           callbacks=[_RampReversal(reversal, domain_weight, steps * epochs),
                                      pick])
    finally:
        for layer in model._flatten_layers():
            layer.trainable = trainable.get(id(layer), layer.trainable)
    pick.restore()
    return AdaptResult(model, "dann", dict(history.history), selected_by,
                       best_epoch=pick.best_epoch)
