"""tf_flowers with EfficientNetB0 (`--base`): two-phase fine-tuning, evaluation, verified export.

    python -m recipes.flowers            # downloads tf_flowers and ImageNet weights
    python -m recipes.flowers --base MobileNetV2 --image_size 160
    python -m recipes.flowers --smoke    # offline: mocked tf_flowers, random weights
    tensorboard --logdir runs/flowers
"""

import contextlib
import os

import tlkeras
from recipes import mocked_tfds, parser


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--base", default="EfficientNetB0", help="a backbone (`tlkeras backbones`)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=5, help="epochs of each phase")
    args = p.parse_args(argv)
    out = args.output_dir or os.path.join("runs", "flowers")
    size, epochs, batch = (32, 1, 4) if args.smoke else (args.image_size, args.epochs, 32)

    with mocked_tfds() if args.smoke else contextlib.nullcontext():
        train = tlkeras.data.from_tfds("tf_flowers", "train[:80%]", (size, size), batch_size=batch,
                                       seed=1, augmentation="light")
        val = tlkeras.data.from_tfds("tf_flowers", "train[80%:]", (size, size), batch_size=batch,
                                     shuffle=False)
        model = tlkeras.build_transfer_model(
            args.base, num_classes=len(train.class_names), input_shape=(size, size, 3),
            weights=None if args.smoke else "imagenet")
        # The training images are augmented: phase 1 cannot train on cached features.
        result = tlkeras.fine_tune(model, train, val, head_epochs=epochs, fine_tune_epochs=epochs,
                                   unfreeze=3, head_learning_rate=1e-3, cache_features=False,
                                   run_dir=out, seed=1)
        report = tlkeras.evaluate(model, val, train.class_names, output_dir=out, overwrite=True,
                                  history=result.history)
        exported = tlkeras.export_model(model, os.path.join(out, "export"),
                                        formats=("keras",) if args.smoke else ("keras", "tflite"),
                                        class_names=train.class_names, representative_data=val)
    print(f"validation accuracy {report.metrics['accuracy']:.3f}; exported {exported.paths}")
    return {"accuracy": report.metrics["accuracy"], "paths": exported.paths, "log_dir": out,
            "model": model}


if __name__ == "__main__":
    main()
