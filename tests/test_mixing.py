"""MixUp/CutMix soft labels in phase 2, the RandAugment preset, and deterministic exports."""

import keras
import numpy as np
import tensorflow as tf

import tlkeras
from conftest import digits_rgb
from test_training import tiny_base
from tlkeras import mixing


def test_mixup_and_cutmix_give_soft_labels_from_keras_layers():
    x, y = digits_rgb(32, classes=[5, 6, 7])
    ds = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(16)
    for method in mixing.MIX_METHODS:
        images, labels = next(iter(mixing.mix_batches(ds, method, num_classes=3, seed=0)))
        labels = labels.numpy()
        assert labels.shape == (16, 3) and np.allclose(labels.sum(-1), 1.0, atol=1e-5)
        assert ((labels > 1e-3) & (labels < 1 - 1e-3)).any(), method  # mixed, not one-hot
        assert images.dtype == tf.float32 and not np.array_equal(images.numpy(), x[:16])


def test_fine_tune_with_cutmix_and_randaugment_exports_without_random_layers():
    x, y = digits_rgb(32, classes=[5, 6, 7])
    train = tlkeras.data.from_arrays(x[:64], y[:64], batch_size=32, seed=0)
    val = tlkeras.data.from_arrays(x[64:96], y[64:96], batch_size=32, shuffle=False)
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(tiny_base(), 3, augmentation="medium")
    assert any(isinstance(l, keras.layers.RandAugment) for l in model.get_layer("augmentation").layers)
    kernel = model.get_layer("predictions").kernel.numpy().copy()
    result = tlkeras.fine_tune(model, train, val, head_epochs=0, fine_tune_epochs=1, mix="cutmix",
                               seed=0, verbose=0)
    assert np.isfinite(result.history["loss"]).all() and "val_accuracy" in result.history
    assert not np.allclose(kernel, model.get_layer("predictions").kernel.numpy())
    exported = tlkeras.models.without_augmentation(model)
    random_layers = [l.name for l in exported._flatten_layers()
                     if "random" in type(l).__name__.lower() or isinstance(
                         l, (keras.layers.RandAugment, keras.layers.MixUp, keras.layers.CutMix))]
    assert random_layers == []
    probe = x[:4]
    np.testing.assert_array_equal(exported.predict(probe, verbose=0), exported.predict(probe, verbose=0))
