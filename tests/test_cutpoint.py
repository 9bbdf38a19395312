"""Cut-point activation cache: same weights as recomputing, rebuilt when the frozen part changes."""

import os

import keras
import numpy as np
import tensorflow as tf

import tlkeras
from conftest import digits_rgb
from test_training import tiny_base
from tlkeras import cutpoint

# float16 activations: the weights after one epoch match recomputing to this tolerance.
RTOL, ATOL = 2e-2, 2e-4
# Pooled features computed from float16 activations vs from the images: float16's 2**-11 relative
# rounding of the activations, carried through one conv, BatchNorm and pooling.
FEATURES_RTOL, FEATURES_ATOL = 5e-3, 1e-4


def test_cached_top_trains_like_the_full_model_and_cache_follows_the_frozen_weights(tmp_path):
    x, y = digits_rgb(32, classes=[5, 6, 7])
    data = tf.data.Dataset.from_tensor_slices((x[:96], y[:96])).batch(32)
    keras.utils.set_random_seed(0)
    full = tlkeras.build_transfer_model(tiny_base(), 3, dropout=0.0)
    cached_model = tlkeras.build_transfer_model(tiny_base(), 3, dropout=0.0)
    cached_model.set_weights(full.get_weights())
    for model in (full, cached_model):
        tlkeras.unfreeze(model, 1, unit="blocks")  # conv3 (+ its frozen BatchNorm)
    bottom, top = cutpoint.split_at(cached_model, 1)
    assert [l.name for l in top.layers[1].layer.layers[1:]] == ["conv3", "bn3"]
    start = tlkeras.get_base(full).get_layer("conv3").kernel.numpy().copy()
    first = cutpoint.cut_activations(bottom, data, cache_dir=tmp_path, key="train", verbose=0)
    assert first.activations.dtype == np.float16 and first.activations.shape == (96, 14, 14, 32)
    # Phase 1's features from the cut activations (fine_tune: one frozen-part pass for both
    # phases) equal the full model's up to the float16 rounding of the activations.
    from_cut = cutpoint.head_features(top, first)
    recomputed = tlkeras.extract_features(cached_model, data, verbose=0)
    np.testing.assert_array_equal(from_cut.labels, recomputed.labels)
    np.testing.assert_allclose(from_cut.features, recomputed.features, rtol=FEATURES_RTOL,
                               atol=FEATURES_ATOL)
    full.compile(keras.optimizers.SGD(0.2), "sparse_categorical_crossentropy")
    top.compile(keras.optimizers.SGD(0.2), "sparse_categorical_crossentropy")
    full.fit(data, epochs=1, verbose=0)
    top.fit(first.dataset(32, shuffle=False), epochs=1, verbose=0)
    for a, b in zip(full.get_weights(), cached_model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    kernels = [tlkeras.get_base(m).get_layer("conv3").kernel.numpy() for m in (full, cached_model)]
    moved, differ = np.abs(kernels[0] - start).max(), np.abs(kernels[0] - kernels[1]).max()
    assert differ < moved / 20, (differ, moved)  # far below what the epoch changed
    # The cache is keyed on the frozen weights: same weights load it, changed ones rebuild it.
    again = cutpoint.cut_activations(bottom, data, cache_dir=tmp_path, key="train", verbose=0)
    assert again.cache_path == first.cache_path
    conv1 = tlkeras.get_base(cached_model).get_layer("conv1")
    conv1.kernel.assign(conv1.kernel * 0.5)
    rebuilt = cutpoint.cut_activations(bottom, data, cache_dir=tmp_path, key="train", verbose=0)
    assert rebuilt.cache_path != first.cache_path
    assert not np.allclose(rebuilt.activations, first.activations)
    assert len(os.listdir(tmp_path)) == 2
    assert cutpoint.split_at(cached_model, "all") is None  # nothing frozen to cache


def test_fine_tune_uses_the_cache_only_without_augmentation(tmp_path):
    x, y = digits_rgb(32, classes=[5, 6, 7])
    train = tlkeras.data.from_arrays(x[:64], y[:64], batch_size=32, seed=0)
    val = tlkeras.data.from_arrays(x[64:96], y[64:96], batch_size=32, shuffle=False)
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(tiny_base(), 3)
    before = tlkeras.get_base(model).get_layer("conv3").kernel.numpy().copy()
    result = tlkeras.fine_tune(model, train, val, head_epochs=1, fine_tune_epochs=2, unfreeze=1,
                               run_dir=tmp_path / "run", seed=0, verbose=0)
    assert len(os.listdir(tmp_path / "run" / "activation_cache")) == 2  # train + validation
    # Phase 1's head features came from those activations: no full-base feature pass.
    assert not os.path.exists(tmp_path / "run" / "feature_cache") and result.used_feature_cache
    assert not np.allclose(before, tlkeras.get_base(model).get_layer("conv3").kernel.numpy())
    assert np.isfinite(result.history["val_loss"]).all() and len(result.history["loss"]) == 3
    result = tlkeras.fine_tune(model, train, val, head_epochs=0, fine_tune_epochs=1, unfreeze=1,
                               mix="mixup", run_dir=tmp_path / "mixed", verbose=0)
    assert not os.path.exists(tmp_path / "mixed" / "activation_cache")


def test_cached_top_computes_pointwise_convolutions_as_matmuls_with_the_same_gradients():
    x, y = digits_rgb(12, classes=[5, 6, 7])
    x, y = x[:16], y[:16]

    def model():
        keras.utils.set_random_seed(1)
        base = keras.Sequential([
            keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 3, name="c1"),
            keras.layers.SeparableConv2D(6, 3, padding="same", activation="relu", name="sep"),
            keras.layers.Conv2D(5, 1, strides=2, name="pw")], name="cnn")
        built = tlkeras.build_transfer_model(base, 3, dropout=0.0)
        tlkeras.unfreeze(built, 2, unit="layers")
        built.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
        return built

    full, cached = model(), model()
    bottom, top = cutpoint.split_at(cached, 2, unit="layers")
    inner = top.layers[1].layer.layers[1:]
    assert [(type(layer).__name__, layer.name) for layer in inner] == [
        ("_MatmulPointwise", "sep"), ("_MatmulPointwise", "pw")]
    activations = bottom(x, training=False)
    np.testing.assert_allclose(top(activations), full(x), rtol=1e-5, atol=1e-6)
    top.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    before = [w.numpy() for w in full.trainable_weights]
    full.train_on_batch(x, y)
    top.train_on_batch(activations, y)
    assert len(top.trainable_weights) == len(before) == 7  # sep: 3, pw: 2, the head: 2
    for start, a, b in zip(before, full.trainable_weights, cached.trainable_weights):
        assert np.abs(a.numpy() - start).max() > 1e-4  # the step moved every weight ...
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)  # ... alike


def test_features_and_cuts_match_their_single_passes_and_keep_to_the_budget():
    x, y = digits_rgb(32, classes=[5, 6, 7])
    # A filter leaves the length unknown (cardinality -2): the budget must count the batches.
    data = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).filter(
        lambda image, label: True).batch(16)
    assert int(data.cardinality()) < 0
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(tiny_base(), 3)
    bottoms, [(pooled, cuts)] = cutpoint.features_and_cuts(model, [data], [1])
    np.testing.assert_allclose(pooled.features, tlkeras.extract_features(model, data, verbose=0)
                               .features, rtol=1e-5, atol=1e-6)
    single = cutpoint.cut_activations(bottoms[1], data, verbose=0)
    np.testing.assert_array_equal(cuts[1].activations, single.activations)
    per_image = 2 * int(np.prod(bottoms[1].output.shape[1:]))  # float16
    kept, _ = cutpoint.features_and_cuts(model, [data], [1], budget_bytes=64 * per_image)
    over, _ = cutpoint.features_and_cuts(model, [data], [1], budget_bytes=64 * per_image - 1)
    assert list(kept) == [1] and not over
