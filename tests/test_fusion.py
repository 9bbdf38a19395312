"""tlkeras.fusion: ensembles, soups and distillation, on tiny models trained on real digits."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tlkeras
from tlkeras import fusion
from tlkeras.export import run_tflite
from conftest import digits_rgb


def _tiny(size, filters, seed, name, dropout=0.0):
    """A small tlkeras transfer model (own conv base, fully trainable) at `size` x `size`."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(filters, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(filters, 3, strides=2, activation="relu")(x)
    base = keras.Model(inputs, x, name=f"{name}_base")
    model = tlkeras.build_transfer_model(base, 10, input_shape=(size, size, 3), dropout=dropout,
                                         pooling=None, name=name)
    tlkeras.unfreeze(model, "all")
    return model


def _fit(model, x, y, epochs=3):
    size = model.input_shape[1:3]
    x = tf.image.resize(x.astype("float32"), size).numpy()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    return model


def _resized(x, model):
    return tf.image.resize(np.asarray(x, "float32"), model.input_shape[1:3]).numpy()


@pytest.fixture(scope="module")
def digits():
    x, y = digits_rgb(32)
    return {"train": (x[:1000], y[:1000]), "val": (x[1000:1400], y[1000:1400]),
            "test": (x[1400:], y[1400:])}


@pytest.fixture(scope="module")
def members(digits):
    """Two trained members of different architectures and input sizes (32 and 24 px)."""
    x, y = digits["train"]
    # b has dropout, which exports (TFLite) must leave out.
    return _fit(_tiny(32, 8, 0, "a"), x, y), _fit(_tiny(24, 12, 1, "b", 0.2), x, y, epochs=2)


def _nll(probabilities, labels):
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1))))


def test_average_and_weighted_ensembles_equal_member_means_and_export(members, digits, tmp_path):
    a, b = members
    x = digits["test"][0][:16].astype("float32")
    pa, pb = a.predict(_resized(x, a), verbose=0), b.predict(_resized(x, b), verbose=0)

    average = tlkeras.ensemble([a, b])
    assert average.input_shape == (None, 32, 32, 3)
    np.testing.assert_allclose(average.predict(x, verbose=0), (pa + pb) / 2, atol=1e-5)

    weighted = tlkeras.ensemble([a, b], method="weighted", validation_data=digits["val"])
    w = weighted.get_layer("predictions").member_weights
    assert min(w) >= 0 and abs(sum(w) - 1) < 1e-6 and abs(w[0] - 0.5) > 1e-3
    np.testing.assert_allclose(weighted.predict(x, verbose=0), w[0] * pa + w[1] * pb, atol=1e-5)
    # The fitted weights beat the uniform ones on the data they were fitted on.
    xv, yv = digits["val"]
    assert (_nll(weighted.predict(xv, verbose=0), yv)
            <= _nll(average.predict(xv, verbose=0), yv) + 1e-6)

    result = tlkeras.export_model(weighted, tmp_path / "export", representative_data=x)
    assert set(result.checks) >= {"keras", "saved_model", "tflite"}
    reloaded = keras.saving.load_model(result.paths["keras"], compile=False, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), w[0] * pa + w[1] * pb, atol=1e-5)
    np.testing.assert_allclose(run_tflite(result.paths["tflite"], x), w[0] * pa + w[1] * pb,
                               atol=1e-4)
    report = tlkeras.evaluate(weighted, digits["test"])
    assert report.task == "multiclass" and report.metrics["accuracy"] > 0.5


def test_soup_averages_weights_greedy_soup_and_refuses_other_architectures(members, digits):
    x, y = digits["train"]
    start = _fit(_tiny(32, 8, 2, "c"), x, y, epochs=1)
    ingredients = []
    for i, part in enumerate((slice(0, 500), slice(500, 1000))):
        member = fusion._clone(start, f"c{i}")
        member.set_weights(start.get_weights())
        ingredients.append(_fit(member, x[part], y[part], epochs=1))
    soup = tlkeras.ensemble(ingredients, method="soup")
    assert soup.soup_members == [0, 1]
    for got, w0, w1 in zip(soup.get_weights(), *(m.get_weights() for m in ingredients)):
        np.testing.assert_allclose(got, (w0 + w1) / 2, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(w0, w1) for w0, w1 in zip(*(m.get_weights() for m in ingredients)))

    greedy = tlkeras.ensemble(ingredients + [start], method="soup", validation_data=digits["val"])
    xv, yv = digits["val"]
    best = max(np.mean(m.predict(xv, verbose=0).argmax(-1) == yv) for m in ingredients + [start])
    assert np.mean(greedy.predict(xv, verbose=0).argmax(-1) == yv) >= best

    with pytest.raises(ValueError, match=r"models\[1\] \('b'\) has another architecture"):
        tlkeras.ensemble(list(members), method="soup")


def test_stacking_learns_from_validation_outputs_only(members, digits):
    a, b = members
    xv, yv = digits["val"]
    with pytest.raises(ValueError, match="validation_data"):
        tlkeras.ensemble([a, b], method="stacking")
    # Validation labels shifted by one class: a meta-classifier fitted on validation outputs
    # learns the shift; one fitted on training outputs (true labels) could not.
    stacked = tlkeras.ensemble([a, b], method="stacking", validation_data=(xv, (yv + 1) % 10))
    x, y = digits["train"]
    predicted = stacked.predict(x[:300], verbose=0).argmax(-1)
    assert np.mean(predicted == (y[:300] + 1) % 10) > 0.8
    assert np.mean(predicted == y[:300]) < 0.1


def _kl(teacher, student, x):
    return fusion.kl_divergence(teacher.predict(_resized(x, teacher), verbose=0),
                                student.predict(_resized(x, student), verbose=0))


def test_distill_from_the_teacher_alone_moves_student_toward_it_resumes_and_exports(
        members, digits, tmp_path):
    teacher = members[0]
    x, y = digits["train"]
    xt = digits["test"][0]
    student = _tiny(16, 8, 3, "student")
    before = _kl(teacher, student, xt)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    run_dir = str(tmp_path / "run")
    result = tlkeras.distill(teacher, student, train, digits["val"], alpha=0.0, temperature=2.0,
                             epochs=3, learning_rate=1e-2, run_dir=run_dir, verbose=0)
    after = _kl(teacher, result.model, xt)
    assert result.model is student and after < 0.6 * before, (before, after)
    assert len(result.history["val_accuracy"]) == 3
    assert os.listdir(os.path.join(run_dir, "logs")) and os.path.isfile(result.paths["model.keras"])
    # Started again with the same run_dir, the finished run is not trained again.
    weights = [w.copy() for w in student.get_weights()]
    again = tlkeras.distill(teacher, student, train, digits["val"], alpha=0.0, temperature=2.0,
                            epochs=3, learning_rate=1e-2, run_dir=run_dir, verbose=0)
    assert len(again.history["val_accuracy"]) == 3
    for w0, w1 in zip(weights, student.get_weights()):
        np.testing.assert_array_equal(w0, w1)
    exported = tlkeras.export_model(student, tmp_path / "student", formats=("tflite",),
                                    quantize="float16",
                                    representative_data=_resized(xt[:8], student))
    assert os.path.getsize(exported.paths["tflite"]) > 0


def test_distill_from_unlabeled_images_only(members, digits):
    teacher = tlkeras.ensemble(list(members))  # an ensemble as the teacher
    images = tf.data.Dataset.from_tensor_slices(digits["train"][0]).batch(64)
    student = _tiny(16, 8, 4, "student")
    xt = digits["test"][0]
    before = _kl(teacher, student, xt)
    result = tlkeras.distill(teacher, student, None, unlabeled_data=images, alpha=0.5,
                             temperature=2.0, epochs=3, learning_rate=1e-2, verbose=0)
    assert _kl(teacher, result.model, xt) < 0.7 * before
    assert max(result.history["student_loss"]) == 0.0  # no label was ever used
    with pytest.raises(ValueError, match="train_data must yield"):
        fusion._labeled(images, "train_data")



@pytest.mark.heavy
def test_distill_to_mobile_recipe_smoke(tmp_path):
    from recipes import distill_to_mobile
    from recipes.fashion_mnist import DATA_DIR

    if not os.path.isdir(DATA_DIR):
        pytest.skip("apt-get install dataset-fashion-mnist")
    # MobileNet as the student: half of MobileNetV3Small's time to train and export.
    result = distill_to_mobile.main(["--smoke", "--output_dir", str(tmp_path), "--student",
                                     "MobileNet"])
    assert os.path.getsize(result["tflite"]) == result["tflite_bytes"] > 0
