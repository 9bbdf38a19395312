"""Face recognition with embeddings from a pretrained base: a classifier and a verification rule.

Each image's embedding is the L2-normalized pooled feature vector of a frozen
ImageNet base. Half of each person's images are the gallery: a linear
classifier fit on them names the other half (identification), and a cosine
similarity threshold chosen on gallery pairs decides "same person or not" for
pairs of the other half (verification).

    python -m recipes.face_recognition --faces_dir people/   # one subfolder per person
    python -m recipes.face_recognition                       # LFW people with >= 20 images (tfds)
    python -m recipes.face_recognition --smoke               # synthetic identities, random weights
"""

import itertools
import os
import tempfile

import numpy as np
from sklearn.linear_model import LogisticRegression

import tlkeras
from recipes import parser


def embeddings(model, data):
    """L2-normalized feature vectors of `data` and their labels."""
    features, labels = tlkeras.extract_features(model, data, verbose=0)
    return features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12), labels


def pairs(labels, rng, limit=2000):
    """Index pairs of the same identity and as many random pairs of different ones."""
    same = [
        (i, j) for i, j in itertools.combinations(range(len(labels)), 2) if labels[i] == labels[j]
    ]
    same = [same[i] for i in rng.permutation(len(same))[:limit]]
    different = []
    while len(different) < len(same):
        i, j = rng.integers(0, len(labels), 2)
        if labels[i] != labels[j]:
            different.append((i, j))
    return np.array(same + different), np.array([1] * len(same) + [0] * len(different))


def similarities(x, index_pairs):
    return np.sum(x[index_pairs[:, 0]] * x[index_pairs[:, 1]], axis=1)


def synthetic_identities(path, people=6, per_person=8, size=48, seed=0):
    """One folder per "person": a fixed random pattern, shifted and lit differently per image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for p in range(people):
        face = np.kron(rng.uniform(30, 225, (6, 6, 3)), np.ones((size // 6 + 2, size // 6 + 2, 1)))
        os.makedirs(os.path.join(path, f"person_{p}"), exist_ok=True)
        for i in range(per_person):
            dy, dx = rng.integers(0, 4, 2)
            image = face[dy:dy + size, dx:dx + size] * rng.uniform(0.85, 1.15)
            image = image + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype("uint8")).save(
                os.path.join(path, f"person_{p}", f"{i}.png"))


def lfw_folder(path, min_images=20):
    """Writes LFW people with at least `min_images` photos as one folder per person (tfds)."""
    import tensorflow_datasets as tfds
    from PIL import Image

    by_name = {}
    for example in tfds.as_numpy(tfds.load("lfw", split="train")):
        by_name.setdefault(example["label"].decode(), []).append(example["image"])
    for name, images in by_name.items():
        if len(images) >= min_images:
            os.makedirs(os.path.join(path, name), exist_ok=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(os.path.join(path, name, f"{i}.png"))
    return path


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--faces_dir", help="one subfolder of face images per person")
    p.add_argument("--base", default="ResNet50")
    p.add_argument("--image_size", type=int, default=224)
    args = p.parse_args(argv)
    faces_dir, size, base = args.faces_dir, args.image_size, args.base
    if args.smoke:
        faces_dir, size, base = tempfile.mkdtemp(prefix="faces_"), 32, "MobileNetV2"
        synthetic_identities(faces_dir)
    elif not faces_dir:
        faces_dir = lfw_folder(
            os.path.join(args.output_dir or os.path.join("runs", "faces"), "lfw")
        )
    gallery, probes = tlkeras.data.from_directory(faces_dir, (size, size), validation_split=0.5,
                                                  subset="both", seed=1, shuffle=False)
    model = tlkeras.build_transfer_model(base, num_classes=len(gallery.class_names),
                                         input_shape=(size, size, 3),
                                         weights=None if args.smoke else "imagenet")
    (x_gallery, y_gallery), (x_probe, y_probe) = embeddings(model, gallery), embeddings(
        model, probes
    )

    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(x_gallery, y_gallery)
    identification = classifier.score(x_probe, y_probe)

    rng = np.random.default_rng(0)
    gallery_pairs, gallery_same = pairs(y_gallery, rng)
    scores = similarities(x_gallery, gallery_pairs)
    candidates = np.unique(scores)
    threshold = candidates[np.argmax([np.mean((scores >= t) == gallery_same) for t in candidates])]
    probe_pairs, probe_same = pairs(y_probe, rng)
    verification = np.mean((similarities(x_probe, probe_pairs) >= threshold) == probe_same)
    print(f"{len(gallery.class_names)} people; identification accuracy {identification:.3f}; "
          f"verification accuracy {verification:.3f} at cosine similarity >= {threshold:.3f}")
    return {"identification_accuracy": identification, "verification_accuracy": verification,
            "threshold": float(threshold), "people": len(gallery.class_names)}


if __name__ == "__main__":
    main()
