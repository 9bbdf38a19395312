"""Frozen features into a scikit-learn SVM: the pretrained base as a fixed feature extractor.

No fine-tuning: the base runs once over the images (features cached on disk)
and an SVM with an RBF kernel is fit on the pooled feature vectors.

    python -m recipes.features_svm                       # tf_flowers, MobileNetV2 ImageNet features
    python -m recipes.features_svm --image_dir photos/   # your own class folders
    python -m recipes.features_svm --smoke               # a synthetic folder, random weights
"""

import os
import tempfile

from sklearn.svm import SVC

import tlkeras
from recipes import parser, synthetic_image_folder


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--image_dir", help="one subfolder of images per class (default: tf_flowers)")
    p.add_argument("--base", default="MobileNetV2")
    p.add_argument("--image_size", type=int, default=224)
    args = p.parse_args(argv)
    out = args.output_dir or os.path.join("runs", "features_svm")
    size = 32 if args.smoke else args.image_size
    image_dir = args.image_dir
    if args.smoke:
        image_dir = tempfile.mkdtemp(prefix="features_svm_")
        synthetic_image_folder(image_dir, num_classes=3, per_class=10, size=size)
    if image_dir:
        train, test = tlkeras.data.from_directory(image_dir, (size, size), validation_split=0.3,
                                                  subset="both", seed=1, shuffle=False)
    else:
        train = tlkeras.data.from_tfds("tf_flowers", "train[:80%]", (size, size), shuffle=False)
        test = tlkeras.data.from_tfds("tf_flowers", "train[80%:]", (size, size), shuffle=False)
    model = tlkeras.build_transfer_model(args.base, num_classes=len(train.class_names),
                                         input_shape=(size, size, 3),
                                         weights=None if args.smoke else "imagenet")
    cache = os.path.join(out, "features")
    svm = tlkeras.fit_sklearn(SVC(kernel="rbf", C=10.0), model, train, cache_dir=cache, key="train")
    features, labels = tlkeras.extract_features(model, test, cache_dir=cache, key="test")
    accuracy = svm.score(features, tlkeras.features.sklearn_labels(labels))
    print(f"SVM on {features.shape[1]}-d {args.base} features: test accuracy {accuracy:.3f} "
          f"on {len(features)} images")
    return {"accuracy": accuracy, "feature_dim": features.shape[1], "svm": svm}


if __name__ == "__main__":
    main()
