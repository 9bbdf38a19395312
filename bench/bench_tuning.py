"""A Keras Tuner search over unfreeze depth: tlkeras.tune vs a plain two-phase HyperModel.

The same search on both sides: RandomSearch with the same seed and the same search space
(unfreeze depth in blocks, fine-tune learning rate on a log scale, dropout), so the trials get
the same hyperparameters; each trial is H head epochs (Adam 1e-3, base frozen) then E fine-tune
epochs (linear warm-up over 10% of the steps, cosine decay), objective val_accuracy.

* plain: a `keras_tuner.HyperModel` whose `build` builds the model (loading the base's
  weights) and whose `fit` trains both phases on the images, every trial;
* tlkeras: `tlkeras.tune(...)`: one pass of the base over the data gives the features and
  the activations below every searched depth, the head is trained on the features once, and
  every trial runs phase 2 only, on the cached activations of the frozen part below its
  depth (depth 0 on the features).

Base: Xception with the real ImageNet weights (../shared/weights), at 71px (its minimum), on
Fashion-MNIST (apt-get install dataset-fashion-mnist; scikit-learn digits otherwise).

    python bench/bench_tuning.py          # 3 trials of 10 head + 2 fine-tune epochs, 128/128 images
    python bench/bench_tuning.py --quick  # 2 trials of 5 + 2 epochs, 96 train / 64 validation
"""

import argparse
import os
import shutil
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import keras_tuner as kt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tlkeras  # noqa: E402
from _common import machine, source_images  # noqa: E402

XCEPTION = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                        "weights", "xception_imagenet_notop.weights.h5"))


def datasets(n_train, n_val, size, batch_size=32, seed=0):
    images, labels, names, source = source_images()
    order = np.random.default_rng(seed).permutation(len(images))[:n_train + n_val]
    x = tf.image.resize(images[order][..., None].astype("float32"), (size, size)).numpy()
    x = np.repeat(x, 3, axis=-1)
    y = labels[order].astype("int32")
    train = tf.data.Dataset.from_tensor_slices((x[:n_train], y[:n_train])).shuffle(
        n_train, seed=seed).batch(batch_size)
    val = tf.data.Dataset.from_tensor_slices((x[n_train:], y[n_train:])).batch(batch_size)
    return train, val, len(names), source


def loadavg():
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def space(hp, depths):
    """The same declarations, in the same order, as tlkeras' default search space."""
    return {
        "unfreeze_depth": hp.Choice("unfreeze_depth", depths),
        "learning_rate": hp.Float("learning_rate", 1e-5, 1e-3, sampling="log", default=1e-4),
        "dropout": hp.Choice("dropout", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], default=0.2),
    }


class PlainTwoPhase(kt.HyperModel):
    """Both phases in every trial, on the images: what Keras Tuner offers today."""

    def __init__(self, depths, num_classes, size, head_epochs):
        super().__init__()
        self.depths, self.num_classes, self.size = depths, num_classes, size
        self.head_epochs = head_epochs

    def build(self, hp):
        values = space(hp, self.depths)
        return tlkeras.build_transfer_model("Xception", self.num_classes,
                                            input_shape=(self.size, self.size, 3),
                                            weights=XCEPTION, dropout=values["dropout"])

    def fit(self, hp, model, x, validation_data=None, epochs=1, callbacks=None, verbose=0,
            **kwargs):
        values = space(hp, self.depths)
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        model.fit(x, validation_data=validation_data, epochs=self.head_epochs, verbose=verbose)
        tlkeras.unfreeze(model, values["unfreeze_depth"], unit="blocks")
        total = int(x.cardinality()) * epochs
        warmup, lr = total // 10, values["learning_rate"]
        schedule = keras.optimizers.schedules.CosineDecay(
            lr / 100 if warmup else lr, decay_steps=max(total - warmup, 1), alpha=0.01,
            warmup_target=lr if warmup else None, warmup_steps=warmup)
        model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        return model.fit(x, validation_data=validation_data, epochs=epochs, callbacks=callbacks,
                         verbose=verbose, **kwargs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--head-epochs", type=int, default=None)
    p.add_argument("--epochs", type=int, default=2, help="fine-tune epochs per trial")
    p.add_argument("--depths", default="0,1,2,3", help="unfreeze depths (blocks) to search")
    p.add_argument("--size", type=int, default=71)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--directory", default="/tmp/tlkeras_bench_tuning")
    a = p.parse_args()
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    trials = a.trials or (2 if a.quick else 3)
    n_train = a.n_train or (96 if a.quick else 128)
    n_val = a.n_val or (64 if a.quick else 128)
    a.head_epochs = a.head_epochs or (5 if a.quick else 10)
    depths = [int(d) for d in a.depths.split(",")]
    print(machine())
    train, val, num_classes, source = datasets(n_train, n_val, a.size)
    print(f"Xception (ImageNet weights) at {a.size}px, {source}: {n_train} train / {n_val} "
          f"validation images, batch 32; tune(seed={a.seed}), {trials} trials of "
          f"{a.head_epochs} head + {a.epochs} fine-tune epochs; depths {depths}")
    shutil.rmtree(a.directory, ignore_errors=True)

    load_plain = loadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    # tlkeras.tune(seed=s) seeds Keras Tuner with s + 1 (which takes 0 for no seed).
    plain = kt.RandomSearch(PlainTwoPhase(depths, num_classes, a.size, a.head_epochs),
                            objective="val_accuracy", max_trials=trials, seed=a.seed + 1,
                            directory=a.directory, project_name="plain")
    plain.search(train, validation_data=val, epochs=a.epochs, verbose=0)
    t_plain, c_plain = time.perf_counter() - t0, time.process_time() - c0
    plain_trials = sorted(plain.oracle.trials.values(), key=lambda t: t.trial_id)

    load_tlkeras = loadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    result = tlkeras.tune("Xception", train, val, num_classes=num_classes, weights=XCEPTION,
                          tuner="random", max_trials=trials, max_epochs=a.epochs,
                          search_space={"unfreeze": depths}, head_epochs=a.head_epochs,
                          run_dir=os.path.join(a.directory, "tlkeras"), seed=a.seed, verbose=0)
    t_tlkeras, c_tlkeras = time.perf_counter() - t0, time.process_time() - c0
    print("load average at end:", loadavg())

    print("\nplain Keras Tuner HyperModel, both phases every trial:")
    for t in plain_trials:
        print(f"  trial {t.trial_id}: {t.hyperparameters.values}  val_accuracy {t.score:.4f}")
    print("tlkeras.tune:")
    print(tlkeras.tuning.format_table(result.trials))
    same = [t.hyperparameters.values for t in plain_trials] == [
        {"unfreeze_depth": r["unfreeze"], "learning_rate": r["fine_tune_learning_rate"],
         "dropout": r["dropout"]} for r in result.trials]
    best_plain = max(t.score for t in plain_trials)
    print(f"\nsame trial hyperparameters on both sides: {same}")
    hypermodel = result.tuner.hypermodel
    print(f"plain:   wall {t_plain:7.1f} s  CPU {c_plain:7.1f} s  best val_accuracy "
          f"{best_plain:.4f}  (load at start {load_plain})")
    print(f"tlkeras: wall {t_tlkeras:7.1f} s  CPU {c_tlkeras:7.1f} s  best val_accuracy "
          f"{result.best_score:.4f}  (load at start {load_tlkeras}; feature extractions: "
          f"{hypermodel.feature_extractions}, heads trained: {hypermodel.heads_trained}, "
          f"depths cut in the feature pass: {hypermodel.cuts_with_features}, cut-point "
          f"activation passes: {hypermodel.activation_builds})")
    print(f"CPU-time ratio {c_plain / c_tlkeras:.2f}x")
    ratio = t_plain / t_tlkeras
    met = ratio >= 4 and result.best_score >= best_plain
    print(f"speed-up {ratio:.2f}x; goal >= 4x at an equal or better best objective: "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
