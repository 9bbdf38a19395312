"""Domain shift: labeled clean digits, unlabeled digits on photo textures (MNIST-M style).

A model trained on the labeled source (scikit-learn's digits, as `tlkeras demo` makes them)
meets a target domain where the same digits are blended onto patches of natural photos
(scikit-learn's sample images, `|photo - digit|` as MNIST-M is made). Only the target's
images are used to adapt: SimCLR `pretrain` of the base on them, then CORAL `adapt`; target
labels only score the result. Then the target images are clustered and searched.

    python -m recipes.domain_shift            # a few minutes on a CPU
    python -m recipes.domain_shift --smoke    # seconds
"""

import os

import numpy as np

import tlkeras
from recipes import parser
from tlkeras.demo import load_digits_rgb, small_cnn


def blend_on_photos(images, seed=0, scale=4):
    """`|photo patch - image|` per image, the patch cut from a random place of a sample photo
    (`scale` times the image size, resized down to it)."""
    import tensorflow as tf
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    size = images.shape[1]
    crop = scale * size
    out = np.empty_like(images)
    for i, image in enumerate(images):
        photo = photos[rng.integers(len(photos))]
        r, c = rng.integers(0, photo.shape[0] - crop), rng.integers(0, photo.shape[1] - crop)
        patch = tf.image.resize(photo[r:r + crop, c:c + crop], (size, size)).numpy()
        out[i] = np.abs(patch - image.astype("float32")).astype("uint8")
    return out


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    out = args.output_dir or os.path.join("runs", "domain_shift")
    x, y = load_digits_rgb()
    order = np.random.default_rng(0).permutation(len(x))
    n = 300 if args.smoke else len(x)
    source, target = order[:n // 2], order[n // 2:n]
    xs, ys = x[source], y[source]
    xt, yt = blend_on_photos(x[target], seed=1), y[target]  # yt: scoring only
    epochs = 1 if args.smoke else 10

    model = tlkeras.build_transfer_model(small_cnn(), 10, weights=None)
    train = tlkeras.data.from_arrays(xs, ys, batch_size=32, seed=0)
    tlkeras.fine_tune(model, train, head_epochs=epochs, fine_tune_epochs=epochs,
                      learning_rate=1e-2, log_dir=os.path.join(out, "source"), verbose=0)

    def target_accuracy():
        return float(np.mean(model.predict(xt, verbose=0).argmax(-1) == yt))

    before = target_accuracy()
    tlkeras.pretrain(model, xt, epochs=epochs, run_dir=os.path.join(out, "pretrain"), verbose=0)
    result = tlkeras.adapt(model, train, xt, method="coral", epochs=epochs, verbose=0)
    after = target_accuracy()
    print(f"target accuracy: source only {before:.3f}, after pretrain + CORAL {after:.3f}")
    print(f"feature covariance gap {result.covariance_gap_before:.3g} -> "
          f"{result.covariance_gap_after:.3g}")
    clusters = tlkeras.cluster(model, xt, labels=yt, max_clusters=12)
    found = tlkeras.similar(model, xt[20:], xt[:20], k=10, index_labels=yt[20:],
                            query_labels=yt[:20], index_path=os.path.join(out, "index.npz"))
    print(f"{clusters.n_clusters} clusters (NMI {clusters.nmi:.3f}); "
          f"recall@10 {found.recall_at_k:.3f}")
    return {"before": before, "after": after, "adapt": result, "clusters": clusters,
            "similar": found}


if __name__ == "__main__":
    main()
