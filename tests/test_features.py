"""tlkeras.features: feature cache, equality with frozen end-to-end training, sklearn."""

import logging
import os

import keras
import numpy as np
import pytest
from PIL import Image

import tlkeras
from tlkeras import data
from tlkeras.features import extract_features, features_dataset, fit_sklearn

SHAPE = (32, 32, 3)


def tiny_model(num_classes=3, dropout=0.0, seed=0):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential([keras.Input(SHAPE), keras.layers.Conv2D(8, 3, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Conv2D(8, 3)],
                            name="tiny_base")
    return tlkeras.build_transfer_model(base, num_classes=num_classes, weights=None,
                                        dropout=dropout)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in range(3):
        os.makedirs(root / f"c{c}")
        for j in range(8):
            img = rng.integers(0, 80, (32, 32, 3)) + np.array([80 * c, 40, 200 - 80 * c])
            Image.fromarray(img.astype(np.uint8)).save(root / f"c{c}" / f"{j}.png")
    return root


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TLKERAS_CACHE_DIR", str(tmp_path / "tlcache"))


def test_features_match_the_extractor_and_labels(folder):
    model = tiny_model()
    ds = data.from_directory(folder, SHAPE[:2], batch_size=5, shuffle=False)
    fs = extract_features(model, ds, verbose=0)
    extractor, _ = tlkeras.split_model(model)
    images = np.concatenate([x for x, _ in ds])
    np.testing.assert_allclose(fs.features, extractor.predict(images, verbose=0), atol=1e-5)
    assert fs.features.shape == (24, 8) and fs.features.dtype == np.float32
    assert fs.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    feats, labels = fs
    assert feats is fs.features and fs.cache_path is None
    # The model stays splittable afterwards (head with dropout and hidden layers).
    bigger = tlkeras.build_transfer_model(tlkeras.get_base(model), num_classes=3,
                                          weights=None, dropout=0.2, hidden_units=(4,))
    extract_features(bigger, ds, verbose=0)
    assert tlkeras.split_model(bigger)[1].output_shape == (None, 3)
    # A plain base (4D output) is average-pooled.
    base = tlkeras.get_base(model)
    pooled, _ = extract_features(base, ds, verbose=0)
    np.testing.assert_allclose(pooled, fs.features, atol=1e-5)


def test_disk_cache_is_reused_and_invalidated(folder, tmp_path, caplog):
    cache = tmp_path / "feats"
    model = tiny_model()
    ds = data.from_directory(folder, SHAPE[:2], batch_size=8, shuffle=False)
    first = extract_features(model, ds, cache_dir=cache, verbose=0)
    assert os.listdir(cache) == [os.path.basename(first.cache_path)]
    with caplog.at_level(logging.INFO, logger="tlkeras"):
        second = extract_features(model, ds, cache_dir=cache, verbose=0)
    assert "Loaded 24 cached features" in caplog.text
    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_array_equal(first.labels, second.labels)
    # Changed base weights or a changed file list make a new cache entry.
    base = tlkeras.get_base(model)
    w = base.layers[0].get_weights()
    base.layers[0].set_weights([w[0] * 1.5, w[1]])
    changed = extract_features(model, ds, cache_dir=cache, verbose=0)
    assert changed.cache_path != first.cache_path
    assert not np.allclose(changed.features, first.features)
    os.remove(folder / "c0" / "0.png")
    fewer = extract_features(model, data.from_directory(folder, SHAPE[:2], shuffle=False),
                             cache_dir=cache, verbose=0)
    assert len(fewer) == 23 and fewer.cache_path != changed.cache_path
    assert len(os.listdir(cache)) == 3
    arrays = data.from_arrays(np.zeros((4, 32, 32)), [0, 1, 2, 0])
    with pytest.raises(ValueError, match="key="):
        extract_features(model, arrays, cache_dir=cache, verbose=0)
    keyed = extract_features(model, arrays, cache_dir=cache, key="zeros-v1", verbose=0)
    assert os.path.exists(keyed.cache_path)


def test_head_on_cached_features_equals_frozen_end_to_end_training(folder):
    ds = data.from_directory(folder, SHAPE[:2], batch_size=6, shuffle=False)
    end_to_end, cached = tiny_model(seed=1), tiny_model(seed=1)
    for a, b in zip(end_to_end.weights, cached.weights):
        np.testing.assert_array_equal(a, b)
    start = end_to_end.get_layer("predictions").get_weights()

    end_to_end.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    end_to_end.fit(ds, epochs=3, shuffle=False, verbose=0)

    fs = extract_features(cached, ds, verbose=0)
    _, head = tlkeras.split_model(cached)
    head.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    head.fit(features_dataset(fs, batch_size=6, shuffle=False), epochs=3, shuffle=False,
             verbose=0)

    got = cached.get_layer("predictions").get_weights()  # head training updated the model
    want = end_to_end.get_layer("predictions").get_weights()
    assert not np.allclose(want[0], start[0])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    for a, b in zip(tlkeras.get_base(end_to_end).weights, tlkeras.get_base(cached).weights):
        np.testing.assert_array_equal(a, b)  # the frozen base did not move


@pytest.mark.parametrize("kind", ["logistic", "svc"])
def test_fit_sklearn_on_features(folder, kind):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    model = tiny_model()
    train, val = data.from_directory(folder, SHAPE[:2], validation_split=0.25, subset="both",
                                     seed=0, label_mode="categorical")
    est = LogisticRegression(max_iter=500) if kind == "logistic" else SVC()
    est = fit_sklearn(est, model, train)
    test = extract_features(model, val, verbose=0)
    assert est.score(test.features, test.labels.argmax(1)) == 1.0
    assert est.classes_.tolist() == [0, 1, 2]
