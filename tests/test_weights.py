"""tlkeras.weights: a base's weights from whole-model files, nested or flattened, any input size."""

import shutil

import h5py
import keras
import numpy as np
import pytest

import tlkeras
from tlkeras.weights import load_base_weights


def _mobilenet(size, alpha=0.35):
    return keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None)


@pytest.fixture(scope="module")
def original():
    """A MobileNetV2 base (alpha 0.35, 48 px) with random non-default weights."""
    base = _mobilenet(48)
    rng = np.random.default_rng(0)
    base.set_weights([
        w * rng.uniform(0.5, 1.5, w.shape).astype("float32") if "variance" in v.path
        else w + rng.normal(0, 0.05, w.shape).astype("float32")
        for v, w in zip(base.weights, base.get_weights())
    ])
    return base


def _as_keras2(path, out):
    """A copy of a Keras 3 legacy `.h5` with Keras 2's weight names (`Conv1/kernel:0`)."""
    shutil.copy(path, out)
    with h5py.File(out, "r+") as f:
        root = f["model_weights"]
        for layer in root.attrs["layer_names"]:
            group = root[layer]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            for name in names:
                group.move(name, name + ":0")
            group.attrs["weight_names"] = [(name + ":0").encode() for name in names]
        f.attrs["keras_version"] = "2.15.0"


def _features(base, size, weights, x):
    """Pooled features of `build_transfer_model(base, weights=...)` on raw pixels `x`."""
    model = tlkeras.build_transfer_model(base, 3, input_shape=(size, size, 3), weights=weights)
    extractor, _ = tlkeras.split_model(model)
    return extractor(x).numpy()


def _reference(original, size, x):
    """What `original` gives at input size `size` (the same weights, rebuilt)."""
    same = _mobilenet(size)
    same.set_weights(original.get_weights())
    return same(x).numpy().mean(axis=(1, 2))


def test_whole_models_nested_flattened_or_keras_at_another_size(original, tmp_path):
    head = [keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.2),
            keras.layers.Dense(5)]
    inputs = keras.Input((48, 48, 3))
    x = inputs
    for layer in [original, *head]:
        x = layer(x)
    nested = keras.Model(inputs, x)  # the base is one layer, e.g. "mobilenetv2_0.35_48"
    x = original.output
    for layer in head:
        x = layer(x)
    flat = keras.Model(original.input, x)  # the base's layers are the model's own
    files = {"nested.h5": nested, "flat.h5": flat, "whole.keras": nested,
             "whole.weights.h5": nested}
    for name, model in files.items():
        (model.save_weights if name.endswith(".weights.h5") else model.save)(str(tmp_path / name))
    original.save_weights(str(tmp_path / "base.weights.h5"))
    for name in ["nested.h5", "flat.h5"]:
        _as_keras2(tmp_path / name, tmp_path / f"keras2_{name}")
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    reference = _reference(original, 32, pixels)
    for name in [*files, "base.weights.h5", "keras2_nested.h5", "keras2_flat.h5"]:
        # saved at 48 px, loaded at 32 px
        features = _features(_mobilenet(32), 32, str(tmp_path / name), pixels)
        np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-4, err_msg=name)


def test_registry_name_takes_a_whole_fine_tuned_h5(tmp_path):
    """The issue's reproduction: a whole model saved by `model.save("x.h5")`, base nested."""
    base = keras.applications.MobileNetV2(input_shape=(48, 48, 3), include_top=False,
                                          weights=None)
    base.set_weights([w + 0.01 for w in base.get_weights()])
    whole = keras.Sequential([keras.Input((48, 48, 3)), base,
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    whole.save(str(tmp_path / "that.h5"))
    model = tlkeras.build_transfer_model("MobileNetV2", 10, input_shape=(32, 32, 3),
                                         weights=str(tmp_path / "that.h5"))
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    same = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False,
                                          weights=None)
    same.set_weights(base.get_weights())
    expected = same(keras.applications.mobilenet_v2.preprocess_input(pixels.copy()))
    extractor, _ = tlkeras.split_model(model)
    np.testing.assert_allclose(extractor(pixels).numpy(), expected.numpy().mean(axis=(1, 2)),
                               rtol=1e-4, atol=1e-4)


def test_mismatch_names_what_was_found_and_the_nearest_candidate(original, tmp_path):
    whole = keras.Sequential([keras.Input((48, 48, 3)), original, keras.layers.Flatten(),
                              keras.layers.Dense(2, name="dense_head")])
    whole.save(str(tmp_path / "whole.h5"))
    other = _mobilenet(48, alpha=0.5)
    before = [w.copy() for w in other.get_weights()]
    with pytest.raises(ValueError) as error:
        load_base_weights(other, str(tmp_path / "whole.h5"))
    message = str(error.value)
    assert "\n" not in message
    assert "matches the architecture 'mobilenetv2_0.50_48'" in message
    assert "'dense_head' [(" in message  # what the file holds, with shapes
    assert "Nearest candidate: 'mobilenetv2_0.35_48'" in message
    assert all((a == b).all() for a, b in zip(before, other.get_weights()))  # nothing assigned


def test_corrupt_or_truncated_files_say_so(original, tmp_path):
    original.save_weights(str(tmp_path / "good.weights.h5"))
    keras.Sequential([keras.Input((48, 48, 3)), original]).save(str(tmp_path / "good.keras"))
    for name in ["good.weights.h5", "good.keras"]:
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / name.replace("good", "cut")
        cut.write_bytes(data[: len(data) // 3])
        with pytest.raises(ValueError, match=f"{cut.name}.*corrupt or truncated"):
            load_base_weights(_mobilenet(48), str(cut))
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="garbage.h5.*corrupt"):
        load_base_weights(_mobilenet(48), str(garbage))
