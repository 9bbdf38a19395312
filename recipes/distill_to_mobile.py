"""A large teacher distilled into a phone-size student, exported to TFLite.

Fashion-MNIST from Debian's files (`apt-get install dataset-fashion-mnist`). The teacher is
Xception with ImageNet weights (`../shared/weights/xception_imagenet_notop.weights.h5` when
present), its head trained on the labeled images. The student, MobileNetV3Small at 32 px
(`--student`; random weights: offline there are none to load), learns from the labels and
from the teacher's outputs on further unlabeled images (`tlkeras.distill`), and is exported
as a float16 TFLite model.

    python -m recipes.distill_to_mobile --labeled 2000 --unlabeled 8000
    python -m recipes.distill_to_mobile --smoke    # 48 labeled, 48 unlabeled, one epoch
"""

import os

import tlkeras
from recipes import parser
from recipes.fashion_mnist import CLASSES, DATA_DIR, WEIGHTS, load


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--labeled", type=int, default=2000, help="labeled training images")
    p.add_argument("--unlabeled", type=int, default=8000, help="unlabeled images (teacher only)")
    p.add_argument("--epochs", type=int, default=20, help="student epochs")
    p.add_argument("--student", default="MobileNetV3Small", help="a backbone (`tlkeras backbones`)")
    args = p.parse_args(argv)
    out = args.output_dir or os.path.join("runs", "distill_to_mobile")
    if not os.path.isdir(DATA_DIR):
        raise SystemExit(f"{DATA_DIR} is missing: apt-get install dataset-fashion-mnist")
    labeled, unlabeled = (48, 48) if args.smoke else (args.labeled, args.unlabeled)
    x, y = load("train", labeled + unlabeled)
    x_test, y_test = load("test", 32 if args.smoke else 2000)
    make = dict(class_names=CLASSES, batch_size=16 if args.smoke else 64, seed=1)
    weights = WEIGHTS if os.path.isfile(WEIGHTS) else "imagenet"
    teacher = tlkeras.build_transfer_model("Xception", 10, input_shape=(71, 71, 3),
                                           weights=weights, name="teacher")
    tlkeras.fine_tune(teacher, tlkeras.data.from_arrays(x[:labeled], y[:labeled],
                                                        image_size=(71, 71), **make),
                      head_epochs=2 if args.smoke else 20, fine_tune_epochs=0,
                      log_dir=os.path.join(out, "teacher"), verbose=0)

    student = tlkeras.build_transfer_model(args.student, 10, input_shape=(32, 32, 3),
                                           weights=None, name="student")
    tlkeras.unfreeze(student, "all")
    train = tlkeras.data.from_arrays(x[:labeled], y[:labeled], image_size=(32, 32), **make)
    extra = tlkeras.data.from_arrays(x[labeled:], image_size=(32, 32), **make)
    test = tlkeras.data.from_arrays(x_test, y_test, image_size=(32, 32), class_names=CLASSES,
                                    shuffle=False)
    result = tlkeras.distill(teacher, student, train, test, unlabeled_data=extra, alpha=0.3,
                             temperature=2.0, epochs=1 if args.smoke else args.epochs,
                             run_dir=os.path.join(out, "student"), seed=1, verbose=0)
    accuracy = tlkeras.evaluate(result.model, test).metrics["accuracy"]
    exported = tlkeras.export_model(result.model, os.path.join(out, "export"), class_names=CLASSES,
                                    formats=("keras", "tflite"), quantize="float16",
                                    representative_data=test)
    size = os.path.getsize(exported.paths["tflite"])
    print(f"student test accuracy {accuracy:.3f}; TFLite (float16) {size / 1e6:.2f} MB: "
          f"{exported.paths['tflite']}")
    return {"accuracy": accuracy, "tflite": exported.paths["tflite"], "tflite_bytes": size}


if __name__ == "__main__":
    main()
