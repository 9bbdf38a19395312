"""lr_find: restores weights, trainable flags and the optimizer; its suggestion trains."""

import glob
import os

import keras
import numpy as np
import pytest

import tlkeras
from conftest import digits_rgb
from test_training import pretrained_base, tiny_base  # noqa: F401 (a fixture)


def test_lr_find_restores_everything_and_its_suggestions_train_both_phases(pretrained_base,
                                                                           tmp_path):
    x, y = digits_rgb(32, classes=[5, 6, 7])
    train = tlkeras.data.from_arrays(x[:128], y[:128], batch_size=16, seed=0)
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(tiny_base(), 3)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x[:16], y[:16], verbose=0)  # the model's own optimizer now has state
    optimizer, state = model.optimizer, [v.numpy().copy() for v in model.optimizer.variables]
    weights = [w.copy() for w in model.get_weights()]
    flags = [layer.trainable for layer in model._flatten_layers()]
    result = tlkeras.lr_find(model, train, phase="fine_tune", steps=40, log_dir=str(tmp_path))
    assert len(result.losses) == len(result.learning_rates) >= 10
    assert result.learning_rates == sorted(result.learning_rates)
    assert result.learning_rates[0] <= result.suggestion <= result.learning_rates[-1]
    assert "minimum" in result.rule
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    assert [layer.trainable for layer in model._flatten_layers()] == flags
    assert model.optimizer is optimizer
    for v, s in zip(optimizer.variables, state):
        np.testing.assert_array_equal(v.numpy(), s)
    assert os.path.getsize(result.plot_path) > 1000
    assert glob.glob(str(tmp_path / "lr_find" / "events.out.tfevents.*"))
    with pytest.raises(ValueError, match="phase"):
        tlkeras.lr_find(model, train, phase="tail")

    # The suggestions train a real small task: digits 5-7 on a base pretrained on digits 0-4.
    fresh = tlkeras.build_transfer_model(keras.saving.load_model(pretrained_base), 3)
    run = tlkeras.fine_tune(fresh, train, head_epochs=3, fine_tune_epochs=2, unfreeze="all",
                            learning_rate="find",
                            fine_tune_learning_rate="find", log_dir=tmp_path / "run", seed=0,
                            verbose=0)
    loss = run.history["loss"]
    assert np.isfinite(loss).all() and loss[2] < loss[0] and loss[-1] < loss[2]
    assert os.path.exists(tmp_path / "run" / "lr_find_head.png")
    assert os.path.exists(tmp_path / "run" / "lr_find_fine_tune.png")
