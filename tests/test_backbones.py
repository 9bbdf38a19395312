"""Every keras.applications architecture builds, trains one step and has correct preprocessing."""

import keras
import numpy as np
import pytest

import tlkeras
from tlkeras import backbones

HEAVY = {
    "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge", "EfficientNetB6", "EfficientNetB7",
    "EfficientNetV2M", "EfficientNetV2L", "NASNetLarge", "ResNet152", "ResNet152V2",
    "InceptionResNetV2", "DenseNet201",
}
# The largest members of a family: built, given every head and run forward, but the training
# step (20-70 s each on two CPU cores) is left to a smaller member, whose blocks come from the
# same Keras code.
GIANTS = (HEAVY - {"InceptionResNetV2"}) | {"ConvNeXtSmall"}


def test_registry_lists_all_keras_applications():
    names = [n for n in dir(keras.applications) if n[0].isupper()]
    assert sorted(names) == backbones.list_backbones()
    assert len(names) == 40
    assert backbones.get("resnet50").name == "ResNet50"
    assert backbones.get("EFFICIENTNET_V2_B0").name == "EfficientNetV2B0"
    with pytest.raises(ValueError, match="Unknown backbone 'resnet51'.*ResNet50"):
        backbones.get("resnet51")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in backbones.list_backbones()]
)
def test_every_backbone_builds_heads_and_trains_one_step(name):
    spec = backbones.get(name)
    size = max(spec.min_size, 32)
    model = tlkeras.build_transfer_model(name, 3, input_shape=(size, size, 3), weights=None, dropout=0.0)
    base = tlkeras.get_base(model)
    assert backbones.find_spec_for_model(base) is spec
    assert model.get_layer("features").output.shape[-1] == spec.feature_dim
    assert model.get_layer("preprocessing").mode == spec.preprocessing

    # The same base under each task's head gives the right output shape.
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype("uint8")
    for task, classes, units in [("binary", None, 1), ("multilabel", 4, 4), ("regression", 2, 2)]:
        other = tlkeras.build_transfer_model(base, classes, task=task, dropout=0.0)
        assert other.output_shape == (None, units)

    # Blocks are the architecture's own, and unfreezing the top one trains only it.
    blocks = tlkeras.models.base_blocks(base)
    assert len(blocks) >= 3, [b for b, _ in blocks]
    unfrozen = tlkeras.unfreeze(model, 1, unit="blocks")
    assert unfrozen and set(map(id, unfrozen)) == set(map(id, blocks[-1][1]))
    assert {id(w) for w in model.trainable_weights} >= {id(w) for layer in unfrozen
                                                       for w in layer.trainable_weights}
    if name in GIANTS:
        assert tuple(model(x).shape) == (2, 3)
        return

    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy", run_eagerly=True)
    before = [w.numpy().copy() for w in model.trainable_weights]
    model.train_on_batch(x, np.array([0, 2]))
    after = [w.numpy() for w in model.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    assert tuple(model(x).shape) == (2, 3)


# One member per family (its smallest: preprocessing is the family's), as its own test.
SMALLEST = {"convnext": "ConvNeXtTiny", "nasnet": "NASNetMobile", "resnet": "ResNet50",
            "resnet_v2": "ResNet50V2", "mobilenet_v3": "MobileNetV3Small"}
FAMILY_EXAMPLES = {}
for _name in backbones.list_backbones():
    FAMILY_EXAMPLES.setdefault(backbones.get(_name).family, _name)
FAMILY_EXAMPLES.update(SMALLEST)


@pytest.mark.parametrize("family,name", sorted(FAMILY_EXAMPLES.items()))
def test_preprocessing_matches_keras_preprocess_input(family, name):
    spec = backbones.get(name)
    size = max(spec.min_size, 32)
    model = tlkeras.build_transfer_model(name, 2, input_shape=(size, size, 3), weights=None)
    raw = np.random.default_rng(1).integers(0, 256, (2, size, size, 3)).astype("float32")
    ours = model.get_layer("preprocessing")(raw).numpy()
    expected = spec.module.preprocess_input(raw.copy())
    np.testing.assert_allclose(ours, np.asarray(expected), rtol=1e-5, atol=1e-4)
    base = tlkeras.get_base(model)
    rescales_inside = any(
        isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)) for layer in base.layers
    )
    if spec.preprocessing == "none":
        # Families that rescale inside the network must get raw pixels: not scaled twice.
        np.testing.assert_array_equal(ours, raw)
        assert rescales_inside, f"{name} was expected to rescale inside the network"
    else:
        assert not np.allclose(ours, raw)
        assert not rescales_inside
