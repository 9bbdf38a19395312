"""resolve_base: every kind of base resolves through one path; `.keras` files as bases."""

import keras
import numpy as np
import pytest

import tlkeras
from tlkeras import anatomy
from test_hub import _export, _feature_net, _tiny_keras_hub_preset

SIZE = 32


def _small_base():
    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False, weights=None)


def _features(model, images):
    return anatomy.feature_extractor(model).predict(images, verbose=0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype("float32")


def test_every_kind_resolves(tmp_path):
    registry = tlkeras.resolve_base("mobilenet_v2", (SIZE, SIZE, 3), weights=None)
    assert registry.layer.name.startswith("mobilenetv2")
    assert (registry.preprocessing, registry.input_shape, registry.is_text) == (
        "tf", (SIZE, SIZE, 3), False)

    base = _small_base()
    own = tlkeras.resolve_base(base)
    assert own.layer is base and (own.preprocessing, own.input_shape) == ("none", (SIZE, 32, 3))

    hub_dir = _export(_feature_net(), str(tmp_path / "sm"))
    hub = tlkeras.resolve_base(hub_dir, (16, 16, 3))
    assert isinstance(hub.layer, tlkeras.HubLayer) and hub.preprocessing == "unit"

    _tiny_keras_hub_preset(str(tmp_path / "preset"))
    preset = tlkeras.resolve_base(str(tmp_path / "preset"), weights=None)
    assert preset.input_shape == (32, 32, 3) and not preset.is_text
    assert preset.preprocessing.name == anatomy.PREPROCESSING


def test_keras_file_bases_give_the_features_of_the_original(tmp_path, images):
    # a base model saved alone
    base = _small_base()
    base.save(tmp_path / "base.keras")
    original = tlkeras.build_transfer_model(base, num_classes=3)
    from_file = tlkeras.build_transfer_model(str(tmp_path / "base.keras"), num_classes=3)
    assert from_file.output_shape == (None, 3)
    np.testing.assert_allclose(_features(from_file, images), _features(original, images),
                               rtol=1e-5, atol=1e-5)

    # a whole transfer model: its base and its preprocessing ("tf") are taken out
    keras.utils.set_random_seed(1)
    whole = tlkeras.build_transfer_model("MobileNetV2", num_classes=5, input_shape=(SIZE, SIZE, 3),
                                         weights=None, augmentation="light")
    whole.save(tmp_path / "whole.keras")
    rebuilt = tlkeras.build_transfer_model(tmp_path / "whole.keras", num_classes=2, unfreeze=1)
    assert rebuilt.output_shape == (None, 2) and not anatomy.has_augmentation(rebuilt)
    assert anatomy.get_preprocessing(rebuilt).get_config()["mode"] == "tf"
    np.testing.assert_allclose(_features(rebuilt, images), _features(whole, images),
                               rtol=1e-5, atol=1e-5)
    assert any(w.trainable for w in anatomy.get_base(rebuilt).weights)


def test_bad_bases_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        tlkeras.resolve_base(str(tmp_path / "missing.keras"))
    bad = tmp_path / "notes.keras"
    bad.write_text("not a keras archive")
    with pytest.raises(ValueError, match="notes.keras") as raised:
        tlkeras.build_transfer_model(str(bad), num_classes=2)
    assert "\n" not in str(raised.value)
    with pytest.raises(TypeError, match="received int"):
        tlkeras.resolve_base(3)
