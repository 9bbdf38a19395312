"""Per-group learning rates, gradual unfreezing and EMA in phase 2, on real small data."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkeras
from conftest import digits_rgb
from test_training import tiny_base
from tlkeras import optimizers

SIZE = 32


def _data(n=64, batch_size=32):
    x, y = digits_rgb(SIZE, classes=[5, 6, 7])
    return tlkeras.data.from_arrays(x[:n], y[:n], batch_size=batch_size, seed=0)


def test_one_sgd_step_moves_each_variable_by_its_groups_learning_rate():
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(tiny_base(), 3)
    tlkeras.unfreeze(model, "all", unit="blocks")
    groups = optimizers.block_groups(model, "all", "blocks")
    assert [[p.split("/")[-2] for p in g] for g in groups] == [["conv3"] * 2, ["conv2"] * 2, ["conv1"] * 2]
    optimizer, _ = optimizers.fine_tuning_setup(model, keras.optimizers.SGD(0.1), layer_decay=0.5)
    assert type(optimizer).__name__ == "LayerwiseSGD"
    x, y = next(iter(_data()))
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    optimizer.apply(grads, model.trainable_variables)
    expected = {"conv3": 0.1, "conv2": 0.05, "conv1": 0.025, "predictions": 0.1}
    for v, g, b in zip(model.trainable_variables, grads, before):
        lr = expected[v.path.split("/")[-2]]
        np.testing.assert_allclose(b - v.numpy(), lr * g.numpy(), rtol=1e-4, atol=1e-7, err_msg=v.path)
    with pytest.raises(ValueError, match="one factor per unfrozen group"):
        optimizers.group_multipliers(groups, [1.0, 0.5])
    with pytest.raises(ValueError, match="layer_decay"):
        optimizers.group_multipliers(groups, 1.5)


def test_gradual_unfreezing_trains_the_expected_blocks_each_epoch_and_saves(tmp_path):
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(tiny_base(), 3)
    base = tlkeras.get_base(model)
    names = ["conv1", "conv2", "conv3"]
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append({n: base.get_layer(n).kernel.numpy().copy() for n in names})

    start = {n: base.get_layer(n).kernel.numpy().copy() for n in names}
    result = tlkeras.fine_tune(model, _data(), _data(32), head_epochs=1, fine_tune_epochs=3,
                               unfreeze="all", layer_decay=0.7, gradual_unfreeze=1,
                               head_learning_rate=1e-2, run_dir=tmp_path / "run",
                               callbacks=[Snapshot()], seed=0, verbose=0)
    assert np.isfinite(result.history["loss"]).all()
    assert all(np.array_equal(snapshots[0][n], start[n]) for n in names)  # phase 1: base frozen
    trained = [[n for n in names if not np.array_equal(snapshots[e][n], snapshots[e + 1][n])]
               for e in range(3)]
    assert trained == [["conv3"], ["conv2", "conv3"], ["conv1", "conv2", "conv3"]]
    loaded = keras.saving.load_model(result.paths["model.keras"])
    assert type(loaded.optimizer).__name__ == "LayerwiseAdam"
    assert loaded.optimizer.multipliers == model.optimizer.multipliers
    assert sorted(set(loaded.optimizer.multipliers.values())) == pytest.approx([0.49, 0.7, 1.0])


def test_ema_weights_are_the_ones_returned():
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(tiny_base(), 3)
    result = tlkeras.fine_tune(model, _data(), _data(32), head_epochs=0, fine_tune_epochs=2,
                               ema=True, seed=0, verbose=0)
    optimizer = model.optimizer  # trained on cut-point activations, compiled like that model
    assert optimizer.use_ema and "val_loss" in result.history
    assert np.isfinite(model.evaluate(_data(32), verbose=0)).all()
    for v, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average):
        np.testing.assert_allclose(v.numpy(), average.numpy(), rtol=1e-6, atol=1e-7)


class _Killed(BaseException):
    """Stands for the process being killed (Keras and tlkeras only catch Exception)."""


class _KillAfterEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):  # after the run folder's backup of this epoch
        if epoch == self.epoch:
            raise _Killed


def test_run_with_every_option_killed_in_phase_2_resumes_with_raw_and_averaged_weights(tmp_path):
    """Layer decay, gradual unfreezing and EMA on: killed after phase 2's second epoch (the
    second block group trained), the resumed run ends where the uninterrupted one does. (A run
    killed by SIGKILL: test_training's test_killed_run_resumes_where_it_stopped.)"""
    x, y = digits_rgb(SIZE, classes=[5, 6, 7])
    train = tlkeras.data.from_arrays(x[:64], y[:64], batch_size=32, shuffle=False)
    val = tlkeras.data.from_arrays(x[64:96], y[64:96], batch_size=32, shuffle=False)
    keras.utils.set_random_seed(0)
    start = tlkeras.build_transfer_model(tiny_base(), 3, dropout=0.0).get_weights()
    args = dict(head_epochs=1, fine_tune_epochs=3, unfreeze="all", ema=True, layer_decay=0.7,
                gradual_unfreeze=1, head_learning_rate=1e-2, seed=0, verbose=0)

    def model():
        fresh = tlkeras.build_transfer_model(tiny_base(), 3, dropout=0.0)
        fresh.set_weights(start)
        return fresh

    whole = model()
    tlkeras.fine_tune(whole, train, val, run_dir=tmp_path / "whole", **args)
    killed = model()
    with pytest.raises(_Killed):  # killed at the end of phase 2's second epoch (epoch 2)
        tlkeras.fine_tune(killed, train, val, run_dir=tmp_path / "killed",
                          callbacks=[_KillAfterEpoch(2)], **args)
    resumed = model()
    result = tlkeras.fine_tune(resumed, train, val, run_dir=tmp_path / "killed", **args)
    assert len(result.history["loss"]) == 4
    # Had the resumed run swapped raw and averaged weights, it would train on from the averages.
    for a, b in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(resumed.optimizer._model_variables_moving_average,
                    whole.optimizer._model_variables_moving_average):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
    saved = keras.saving.load_model(result.paths["model.keras"])
    for a, b in zip(saved.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
