"""Cats vs dogs with MobileNetV2 at 160 px, as in TensorFlow's transfer-learning tutorial.

The tutorial's choices: flip + rotation augmentation, RMSprop at 1e-4 for the
head, then the top 54 layers (from layer 100 on) fine-tuned at 1e-5.

    python -m recipes.cats_vs_dogs            # downloads cats_vs_dogs and ImageNet weights
    python -m recipes.cats_vs_dogs --smoke    # offline: mocked cats_vs_dogs, random weights
"""

import contextlib
import os

import keras

import tlkeras
from recipes import mocked_tfds, parser


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--head_epochs", type=int, default=10)
    p.add_argument("--fine_tune_epochs", type=int, default=10)
    args = p.parse_args(argv)
    out = args.output_dir or os.path.join("runs", "cats_vs_dogs")
    size = 32 if args.smoke else 160
    epochs = (1, 1) if args.smoke else (args.head_epochs, args.fine_tune_epochs)
    mock = mocked_tfds() if args.smoke else contextlib.nullcontext()
    with mock:
        train = tlkeras.data.from_tfds("cats_vs_dogs", "train[:80%]", (size, size),
                                       batch_size=4 if args.smoke else 32, seed=1)
        val = tlkeras.data.from_tfds("cats_vs_dogs", "train[80%:]", (size, size),
                                     batch_size=4 if args.smoke else 32, shuffle=False)
        model = tlkeras.build_transfer_model(
            "MobileNetV2", num_classes=len(train.class_names), input_shape=(size, size, 3),
            weights=None if args.smoke else "imagenet",
            augmentation=[keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)])
        tlkeras.fine_tune(model, train, val, head_epochs=epochs[0], fine_tune_epochs=epochs[1],
                          unfreeze=54, unfreeze_unit="layers", optimizer="rmsprop",
                          head_learning_rate=1e-4, fine_tune_learning_rate=1e-5, run_dir=out,
                          seed=1)
        report = tlkeras.evaluate(model, val, train.class_names, output_dir=out, overwrite=True)
    print(f"validation accuracy {report.metrics['accuracy']:.3f}; run folder {out}")
    return {"accuracy": report.metrics["accuracy"], "log_dir": out, "model": model}


if __name__ == "__main__":
    main()
