"""Test-time augmentation: the averaged model, its saving, and evaluate(tta=True)."""

import keras
import numpy as np

import tlkeras
from conftest import digits_rgb
from test_training import tiny_base


def test_tta_model_averages_flips_saves_and_evaluates(tmp_path):
    x, y = digits_rgb(32, classes=[5, 6, 7])
    x, y = x[:48], y[:48]
    keras.utils.set_random_seed(0)
    model = tlkeras.build_transfer_model(tiny_base(), 3)
    tta = tlkeras.tta.tta_model(model)
    expected = (model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(tta.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, model.predict(x, verbose=0))  # the flip really changes things
    tta.save(tmp_path / "tta.keras")
    loaded = keras.saving.load_model(tmp_path / "tta.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    report = tlkeras.evaluate(model, (x, y), tta=True)
    accuracy = float(np.mean(np.argmax(expected, -1) == y))
    assert report.metrics["accuracy"] == accuracy
