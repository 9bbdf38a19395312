"""Why did the model say that: Grad-CAM, integrated gradients and occlusion maps.

`explain` works on every image model tlkeras builds, including the nested
pretrained base that makes the usual Grad-CAM recipe fail with "Graph
disconnected": the forward pass is rebuilt from the base's own graph so that
it returns the chosen inner layer's activations together with the predictions.

Example:

>>> import numpy as np, tlkeras
>>> model = tlkeras.build_transfer_model(
...     "MobileNetV2", num_classes=3, input_shape=(64, 64, 3), weights=None)
>>> images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)).astype("uint8")
>>> explanation = tlkeras.explain(model, images)
>>> explanation.heatmaps.shape
(2, 64, 64)
>>> bool(explanation.heatmaps.min() >= 0)
True

Text models get `(word, score)` pairs on the text's words (integrated gradients on the token
embeddings for KerasHub presets; occlusion here, as this model has no token embedding):

>>> import keras
>>> vectorize = keras.layers.TextVectorization(vocabulary=["oil", "shares"], output_mode="count")
>>> text = keras.Input((), dtype="string")
>>> text_model = keras.Model(text, keras.layers.Dense(2, activation="softmax")(vectorize(text)))
>>> explanation = tlkeras.explain(text_model, ["Oil prices rose"])
>>> explanation.method, [word for word, score in explanation.tokens[0]]
('occlusion', ['Oil', 'prices', 'rose'])
"""

import dataclasses
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

from tlkeras.export import run_tflite
from tlkeras.anatomy import PREPROCESSING
from tlkeras.layers import InferenceMode
from tlkeras.models import _all_sublayers, get_base

__all__ = ["Explanation", "RandomizationCheck", "explain", "explain_check", "METHODS"]

METHODS = ("gradcam", "gradcam++", "integrated_gradients", "occlusion")


@dataclasses.dataclass
class RandomizationCheck:
    """Model-randomization sanity check (Adebayo et al., 2018).

    Attributes:
        similarity: per image, the Spearman rank correlation between the map of
            the model and the map of the same architecture with re-initialized
            weights (1 = identical ranking).
        mean_similarity: mean of `similarity`.
        passed: `mean_similarity < threshold`: the maps depend on the learned
            weights rather than on the input alone.
        threshold: the threshold used.
    """

    similarity: np.ndarray
    mean_similarity: float
    passed: bool
    threshold: float


@dataclasses.dataclass
class Explanation:
    """What `explain` found.

    Attributes:
        method: the attribution method.
        heatmaps: `(N, H, W)` float32, non-negative, at the input's resolution
            (image models; each map scaled to a maximum of 1), or None (text).
        predicted: `(N,)` predicted class indexes.
        explained: `(N,)` class indexes the maps explain.
        probabilities: `(N, classes)` model outputs.
        images: the explained inputs (images, or strings for text models).
        layer_name: the layer Grad-CAM used (else None).
        attributions: `"integrated_gradients"`'s raw attributions, which sum
            to the score difference from the baseline: per pixel and channel
            `(N, H, W, C)` for images, per position of the packed token
            sequence `(N, sequence_length)` for text; else None.
        tokens: text models: per input, a list of `(token, score)` pairs on
            the text's words (see `explain`'s `method`).
        check: a `RandomizationCheck` when `explain(..., check=True)`.
    """

    method: str
    heatmaps: np.ndarray
    predicted: np.ndarray
    explained: np.ndarray
    probabilities: np.ndarray
    images: object = None
    layer_name: str = None
    attributions: np.ndarray = None
    tokens: list = None
    check: RandomizationCheck = None

    def overlay(self, alpha=0.45, colormap="jet"):
        """The images with their heatmaps blended on top: `(N, H, W, 3)` uint8."""
        if self.heatmaps is None:
            raise ValueError("overlay(): this explanation has token scores, not heatmaps.")
        return overlay(self.images, self.heatmaps, alpha=alpha, colormap=colormap)

    def save(self, directory, names=None):
        """Writes one PNG overlay per image, or for text one page `tokens.html`.

        `tokens.html` shows each text with its words shaded by score (red: for
        the explained class, blue: against it; hover for the value) under a
        caption: `names[i]` if given, then the explained class and its score.
        Returns the list of written paths.
        """
        import html

        os.makedirs(directory, exist_ok=True)
        if self.heatmaps is None:
            path = os.path.join(directory, "tokens.html")
            names = names or [f"text {i}" for i in range(len(self.tokens))]
            scores = [_class_scores(p[None], c)[0] for p, c in zip(self.probabilities,
                                                                   self.explained)]
            with open(path, "w") as f:
                f.write("<!doctype html><meta charset='utf-8'><title>tokens</title><body "
                        "style='font-family:sans-serif;line-height:1.6;max-width:60em'>"
                        f"<h1>{html.escape(self.method)}</h1>")
                f.write("".join(
                    f"<h3>{html.escape(str(name))}: class {int(c)} ({score:.3f})</h3>"
                    f"<p>{html_tokens(pairs)}</p>"
                    for name, c, score, pairs in zip(names, self.explained, scores, self.tokens)))
            return [path]
        names = names or [f"{i:04d}_class{int(c)}.png" for i, c in enumerate(self.explained)]
        paths = []
        for name, image in zip(names, self.overlay()):
            paths.append(os.path.join(directory, name))
            keras.utils.save_img(paths[-1], image, scale=False)
        return paths


def explain(
    model,
    inputs,
    *,
    method=None,
    class_index=None,
    layer_name=None,
    steps=32,
    baseline=None,
    patch_size=None,
    stride=None,
    batch_size=32,
    check=False,
):
    """Explains the predictions of `model` on `inputs`.

    Args:
        model: a `keras.Model` (any tlkeras image model: registry, user or
            hub base), or for `"occlusion"` any callable mapping a batch to
            probabilities, or the path of an exported SavedModel folder, a
            `.tflite` or a `.keras` file.
        inputs: images `(N, H, W, 3)` of raw [0, 255] pixels (one image
            `(H, W, 3)` is accepted), or a list of strings for a text model.
        method: `"gradcam"`, `"gradcam++"`, `"integrated_gradients"` or
            `"occlusion"`. Default: `"gradcam"` for images; for text,
            `"integrated_gradients"` on the token embeddings of a tlkeras
            model on a KerasHub preset (one pass per path step, whatever the
            text's length), else `"occlusion"` (one pass per word).
            Text models get `(token, score)` pairs in `.tokens`: the words of
            the text (split at whitespace, so they line up with it) with their
            score; integrated gradients sum each word's word pieces (special
            and padding tokens are left out; words past the model's sequence
            length score 0; a tokenizer that does not split word by word, such
            as a byte-pair encoder, gives its own tokens instead), occlusion
            gives the drop of the class score when the word is removed.
        class_index: the class to explain: an int, one per input, or None for
            the predicted class.
        layer_name: Grad-CAM's layer (inside the base, or in the model);
            default: the last layer with a 4-D output of spatial size > 1.
        steps: integrated gradients' number of path steps.
        baseline: integrated gradients' and occlusion's reference: a pixel
            value (default 0, black) for images; for text (integrated
            gradients) None, the pad token's embedding in place of each real
            token, or a number for a constant embedding (special tokens and
            positions are kept).
        patch_size, stride: occlusion's window (default: 1/7 of the image
            side, half that stride).
        batch_size: batch size of the model calls.
        check: also run `explain_check` and store it in `.check`.

    Returns:
        An `Explanation`.
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"explain(): expected method in {METHODS}, received method={method!r}.")
    if isinstance(model, (str, os.PathLike)):
        model = load_callable(model)
    if _is_text(model, inputs):
        return _explain_text(model, inputs, method, class_index, steps, baseline, batch_size)
    method = method or "gradcam"
    baseline = 0.0 if baseline is None else baseline
    images = np.asarray(inputs)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(
            f"explain(): expected images of shape (N, H, W, C) or (H, W, C), received shape "
            f"{images.shape}."
        )
    if method in ("gradcam", "gradcam++"):
        result = _gradcam(model, images, class_index, layer_name, method == "gradcam++")
    elif method == "integrated_gradients":
        result = _integrated_gradients(model, images, class_index, steps, baseline, batch_size)
    else:
        result = _occlusion(model, images, class_index, patch_size, stride, baseline, batch_size)
    result.images = images
    if check:
        result.check = explain_check(
            model, images, method=method, class_index=result.explained, layer_name=layer_name,
            reference=result,
        )
    return result


def explain_check(model, inputs, *, method="gradcam", class_index=None, threshold=0.5,
                  reference=None, **kwargs):
    """Model-randomization check: do the maps change when the weights are re-initialized?

    Builds the same architecture with fresh random weights (`keras.models.clone_model`),
    explains the same classes with both models, and compares each pair of maps by
    Spearman rank correlation. Maps that hardly change (an edge detector) fail.

    Returns a `RandomizationCheck`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"explain_check(): expected a keras.Model, received {type(model).__name__}."
        )
    reference = reference or explain(model, inputs, method=method, class_index=class_index,
                                     **kwargs)
    randomized = keras.models.clone_model(model)  # new layers: freshly initialized weights
    other = explain(randomized, reference.images, method=method,
                    class_index=reference.explained, **kwargs)
    similarity = np.array([_spearman(a, b) for a, b in zip(reference.heatmaps, other.heatmaps)])
    mean = float(np.mean(similarity))
    return RandomizationCheck(similarity, mean, bool(mean < threshold), threshold)


def overlay(images, heatmaps, alpha=0.45, colormap="jet"):
    """Blends `heatmaps` `(N, H, W)` in [0, 1] over `images`; returns `(N, H, W, 3)` uint8."""
    from matplotlib import colormaps

    images = np.asarray(images, dtype="float32")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    colors = colormaps[colormap](np.clip(heatmaps, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * images[..., :3] + alpha * colors, 0, 255).astype("uint8")


def html_tokens(pairs):
    """`(token, score)` pairs as HTML spans shaded by score (red: supports the class)."""
    import html

    top = max([abs(s) for _, s in pairs] + [1e-12])
    spans = []
    for token, score in pairs:
        a = min(abs(score) / top, 1.0)
        color = f"rgba(220,40,40,{a:.2f})" if score > 0 else f"rgba(40,90,220,{a:.2f})"
        spans.append(f"<span title='{score:.3f}' style='background:{color}'>"
                     f"{html.escape(token)}</span>")
    return " ".join(spans)


def load_callable(path):
    """A batch-of-images -> probabilities function for an exported model path.

    Accepts an exported SavedModel folder (its `serving_default` signature), a
    `.tflite` file, a `.keras` file, or a run/export folder holding `model.keras`.
    """
    path = os.fspath(path)
    if path.endswith(".tflite"):
        return lambda images: run_tflite(path, np.asarray(images, "float32"))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        serving = tf.saved_model.load(path).signatures["serving_default"]
        return lambda images: serving(images=tf.constant(images, tf.float32))["probabilities"]
    inside = os.path.join(path, "model.keras")
    if os.path.isdir(path) and os.path.isfile(inside):
        path = inside
    if path.endswith(".keras") and os.path.isfile(path):
        # importing any tlkeras module ran tlkeras/__init__, which registers every tlkeras layer
        return keras.saving.load_model(path, compile=False)
    raise ValueError(
        f"explain(): cannot load a model from {path!r}: expected a .keras or .tflite file, an "
        "exported SavedModel folder, or a folder holding model.keras."
    )


def input_size(model):
    """`(height, width)` a Keras model, exported SavedModel folder or `.tflite` file takes."""
    if isinstance(model, keras.Model):
        return tuple(model.input_shape[1:3])
    path = os.fspath(model)
    if path.endswith(".tflite"):
        interpreter = tf.lite.Interpreter(model_path=path)
        return tuple(int(v) for v in interpreter.get_input_details()[0]["shape"][1:3])
    serving = tf.saved_model.load(path).signatures["serving_default"]
    spec = next(iter(serving.structured_input_signature[1].values()))
    return tuple(spec.shape[1:3])


# --- Grad-CAM ------------------------------------------------------------------------------


def spatial_layer(model):
    """The name of the layer Grad-CAM uses by default, and the model holding it.

    The last layer (not padding or cropping) with a 4-D output of spatial size
    > 1: inside the base of a tlkeras transfer model, else in `model` itself.
    Returns `(owner, name)`.
    """
    owner = _inner_base(model) or model
    for layer in reversed(owner.layers):
        if isinstance(layer, _GEOMETRY_LAYERS):
            continue  # padding and cropping only move the borders
        shape = _output_shape(layer)
        if shape is not None and len(shape) == 4 and (shape[1] or 2) * (shape[2] or 2) > 1:
            return owner, layer.name
    raise ValueError(
        f"explain(): model {model.name!r} has no layer with a 4-D output of spatial size > 1 "
        "for Grad-CAM; use method='integrated_gradients' or 'occlusion'."
    )


_GEOMETRY_LAYERS = (keras.layers.ZeroPadding2D, keras.layers.Cropping2D)


def _inner_base(model):
    """The nested base (a functional keras.Model) of a tlkeras model, or None."""
    try:
        base = get_base(model)
    except (ValueError, AttributeError, IndexError):
        return None
    if not isinstance(base, keras.Model):
        raise ValueError(
            f"explain(): the base {base.name!r} of model {model.name!r} is a "
            f"{type(base).__name__} whose inside Keras cannot reach (e.g. a hub SavedModel); "
            "use method='occlusion' (or 'integrated_gradients')."
        )
    if not hasattr(base, "_nodes_by_depth") and not isinstance(base, keras.Sequential):
        raise ValueError(
            f"explain(): the base {base.name!r} is a subclassed keras.Model without a graph; "
            "use method='occlusion' (or 'integrated_gradients'), or a functional base."
        )
    return base


def _output_shape(layer):
    if isinstance(layer, keras.layers.InputLayer):
        return None
    try:
        output = layer.output
    except (AttributeError, ValueError):
        return None
    return tuple(output.shape) if hasattr(output, "shape") else None


def _activation_model(model, layer_name):
    """A callable `images -> (activations, outputs)` for the layer `layer_name`.

    It holds the model's layers, not the model (`_GRADCAM` keeps it per model).
    """
    base = _inner_base(model)
    if base is not None and layer_name is not None and layer_name in [l.name for l in model.layers]:
        base = None  # the user named a layer of the outer model
    if base is None:
        name = layer_name or spatial_layer(model)[1]
        inner = keras.Model(model.inputs, [_get_layer(model, name).output, *model.outputs])
        return name, lambda x: inner(x, training=False)
    name = layer_name or spatial_layer(model)[1]
    inner = keras.Model(base.inputs, [_get_layer(base, name).output, *base.outputs])
    wrapper = next(
        l for l in model.layers if l is base or (isinstance(l, InferenceMode) and l.layer is base)
    )
    # A tlkeras image model is a chain of layers.
    chain = [l for l in model.layers
             if not isinstance(l, keras.layers.InputLayer) and l.name != "augmentation"]

    def forward(x):
        activations = None
        for layer in chain:
            if layer is wrapper:
                activations, x = inner(x, training=False)
            else:
                x = layer(x, training=False)
        return activations, x

    return name, forward


_GRADCAM = weakref.WeakKeyDictionary()  # model -> {layer_name: (name, traced pass)}


def _gradcam_pass(model, layer_name):
    """`(name, pass)`: `pass(images, classes)` gives the layer's activations, the outputs, the
    explained classes (a class < 0: the predicted one) and d score / d activations.

    The pass runs eagerly, except on a model with grouped convolutions (ConvNeXt's): Keras
    compiles those with XLA on CPU, again on every eager call, so there the pass is a
    `tf.function` traced once per model and layer and kept for every later call (elsewhere a
    trace costs more than the eager passes it saves).
    """
    if layer_name in _GRADCAM.get(model, {}):
        return _GRADCAM[model][layer_name]
    name, forward = _activation_model(model, layer_name)

    def gradcam_pass(x, classes):
        with tf.GradientTape() as tape:
            activations, outputs = forward(x)
            outputs = tf.cast(outputs, tf.float32)
            if outputs.shape[-1] == 1:
                predicted = tf.cast(outputs[:, 0] >= 0.5, classes.dtype)
            else:
                predicted = tf.argmax(outputs, axis=-1, output_type=classes.dtype)
            classes = tf.where(classes < 0, predicted, classes)
            score = _score(outputs, classes)
        return activations, outputs, classes, tape.gradient(score, activations)

    if not any(getattr(l, "groups", 1) > 1 for l in _all_sublayers(model)):
        return name, gradcam_pass
    _GRADCAM.setdefault(model, {})[layer_name] = name, tf.function(gradcam_pass,
                                                                  reduce_retracing=True)
    return _GRADCAM[model][layer_name]


def _get_layer(model, name):
    try:
        return model.get_layer(name)
    except ValueError:
        names = [l.name for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        raise ValueError(
            f"explain(): layer_name={name!r} is not a layer of {model.name!r}; its layers end "
            f"with {names[-5:]}."
        ) from None


def _gradcam(model, images, class_index, layer_name, plus):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"explain(method='gradcam'): expected a keras.Model, received "
            f"{type(model).__name__}; use method='occlusion' for other models."
        )
    name, gradcam_pass = _gradcam_pass(model, layer_name)
    maps, probabilities, explained = [], [], []
    for start in range(0, len(images), 16):
        x = tf.constant(images[start:start + 16], tf.float32)
        wanted = (np.full(len(x), -1) if class_index is None else  # -1: the predicted class
                  _requested(class_index, start, len(x), model.outputs[0].shape[-1]))
        activations, outputs, classes, grads = gradcam_pass(x, tf.constant(wanted, tf.int32))
        classes = classes.numpy().astype(int)
        grads = tf.cast(grads, tf.float32)
        activations = tf.cast(activations, tf.float32)  # mixed precision: float16
        if plus:
            g2, g3 = grads**2, grads**3
            total = tf.reduce_sum(activations, axis=(1, 2), keepdims=True)
            denominator = 2.0 * g2 + total * g3
            alpha = g2 / tf.where(tf.abs(denominator) > 1e-12, denominator, 1e-12)
            weights = tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2))
        else:
            weights = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", activations, weights))
        cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0]
        maps.append(_normalize(cam.numpy()))
        probabilities.append(outputs.numpy())
        explained.append(classes)
    probabilities = np.concatenate(probabilities)
    return Explanation(
        method="gradcam++" if plus else "gradcam", heatmaps=np.concatenate(maps),
        predicted=_predicted(probabilities), explained=np.concatenate(explained),
        probabilities=probabilities, layer_name=name,
    )


# --- Integrated gradients and occlusion ----------------------------------------------------


def _integrated_gradients(model, images, class_index, steps, baseline, batch_size):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "explain(method='integrated_gradients'): expected a differentiable keras.Model, "
            f"received {type(model).__name__}; use method='occlusion'."
        )
    x = images.astype("float32")
    probabilities = _predict(model, x, batch_size)
    classes = _classes(probabilities, class_index, 0, len(x))
    reference = np.full_like(x[:1], baseline)
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype="float32")
    weights = np.full(steps + 1, 1.0 / steps, "float32")
    weights[[0, -1]] /= 2  # trapezoidal rule
    attributions = np.zeros_like(x)
    for i in range(len(x)):
        path = reference + alphas[:, None, None, None] * (x[i:i + 1] - reference)
        grads = []
        for start in range(0, len(path), batch_size):
            chunk = tf.constant(path[start:start + batch_size])
            with tf.GradientTape() as tape:
                tape.watch(chunk)
                outputs = tf.cast(model(chunk, training=False), tf.float32)
                score = _score(outputs, np.full(len(chunk), classes[i]))
            grads.append(tape.gradient(score, chunk).numpy())
        average = np.tensordot(weights, np.concatenate(grads), axes=1)
        attributions[i] = (x[i] - reference[0]) * average
    heatmaps = _normalize(np.abs(attributions).sum(axis=-1))
    return Explanation(
        method="integrated_gradients", heatmaps=heatmaps, predicted=_predicted(probabilities),
        explained=classes, probabilities=probabilities, attributions=attributions,
    )


def _occlusion(model, images, class_index, patch_size, stride, baseline, batch_size):
    x = images.astype("float32")
    height, width = x.shape[1:3]
    patch = patch_size or max(1, round(max(height, width) / 7))
    stride = stride or max(1, patch // 2)
    probabilities = _predict(model, x, batch_size)
    classes = _classes(probabilities, class_index, 0, len(x))
    tops = list(range(0, max(height - patch, 0) + 1, stride))
    lefts = list(range(0, max(width - patch, 0) + 1, stride))
    tops += [height - patch] if tops[-1] + patch < height else []
    lefts += [width - patch] if lefts[-1] + patch < width else []
    windows = [(t, l) for t in tops for l in lefts]
    heatmaps = np.zeros((len(x), height, width), "float32")
    for i in range(len(x)):
        occluded = np.repeat(x[i:i + 1], len(windows), axis=0)
        for k, (t, l) in enumerate(windows):
            occluded[k, t:t + patch, l:l + patch] = baseline
        scores = _class_scores(_predict(model, occluded, batch_size), classes[i])
        drop = _class_scores(probabilities[i:i + 1], classes[i])[0] - scores
        total, count = np.zeros((height, width)), np.zeros((height, width))
        for (t, l), d in zip(windows, drop):
            total[t:t + patch, l:l + patch] += d
            count[t:t + patch, l:l + patch] += 1
        heatmaps[i] = np.maximum(total / np.maximum(count, 1), 0)
    return Explanation(
        method="occlusion", heatmaps=_normalize(heatmaps), predicted=_predicted(probabilities),
        explained=classes, probabilities=probabilities,
    )


def _explain_text(model, texts, method, class_index, steps, baseline, batch_size):
    texts = [texts] if isinstance(texts, str) else [_text(t) for t in texts]
    if method in ("gradcam", "gradcam++"):
        raise ValueError(
            f"explain(): method={method!r} is for images; for a text model use "
            "method='integrated_gradients' or 'occlusion'."
        )
    parts = None
    if method in (None, "integrated_gradients"):  # kept per model: its tf.function is traced once
        parts = _PARTS[model] if model in _PARTS else _PARTS.setdefault(model,
                                                                        _embedding_parts(model))
    if method == "integrated_gradients" and isinstance(parts, str):
        raise ValueError(f"explain(method='integrated_gradients'): {parts}; use "
                         "method='occlusion'.")
    method = "integrated_gradients" if method is None and not isinstance(parts, str) else (
        method or "occlusion")
    probabilities = _predict(model, np.array(texts, dtype=object), batch_size)
    classes = _classes(probabilities, class_index, 0, len(texts))
    attributions = None
    if method == "integrated_gradients":
        pairs, attributions = _text_integrated_gradients(
            parts, texts, classes, steps, baseline, batch_size)
    else:
        pairs = [_word_occlusion(model, text, probabilities[i:i + 1], classes[i], batch_size)
                 for i, text in enumerate(texts)]
    return Explanation(
        method=method, heatmaps=None, predicted=_predicted(probabilities), explained=classes,
        probabilities=probabilities, images=texts, attributions=attributions, tokens=pairs,
    )


def _word_occlusion(model, text, probabilities, cls, batch_size):
    """Per whitespace word: the drop of the class score when the word is removed."""
    words = text.split()
    if not words:
        return []
    variants = [" ".join(words[:k] + words[k + 1:]) for k in range(len(words))]
    scores = _class_scores(_predict(model, np.array(variants, dtype=object), batch_size), cls)
    full = _class_scores(probabilities, cls)[0]
    return [(w, float(full - s)) for w, s in zip(words, scores)]


_PARTS = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class _EmbeddingParts:
    """A tlkeras text model opened at its token embeddings (see `_embedding_parts`)."""

    preprocessing: keras.layers.Layer  # text -> dict of token_ids, padding_mask, ...
    embedding: keras.layers.Layer  # token_ids -> (batch, tokens, dim)
    gradients: object  # (path embeddings, token dict, classes) -> d score / d embeddings
    tokenizer: object


def _embedding_parts(model):
    """`_EmbeddingParts` of a KerasHub text model built by tlkeras, else why not (a str).

    The model's graph and its backbone's are run as they are, node by node, with the token
    embedding layer's output replaced by the given embeddings (Keras' functional graph
    runner): no new model is built, so no node is added to the model's layers (cutting a
    functional model at an inner tensor would add some, and `model.save` would then fail).
    """
    if not isinstance(model, keras.Model) or PREPROCESSING not in [l.name for l in
                                                                   model.layers]:
        return "the model is not a tlkeras text model on a KerasHub preset"
    preprocessing = model.get_layer(PREPROCESSING)
    base = _inner_base(model)
    embedding = getattr(base, "token_embedding", None) if base is not None else None
    if embedding is None and base is not None and "token_embedding" in [
            l.name for l in base.layers]:
        embedding = base.get_layer("token_embedding")
    tokenizer = getattr(getattr(preprocessing, "preprocessor", None), "tokenizer", None)
    if embedding is None or tokenizer is None:
        return "found no token embedding layer and tokenizer in the model's backbone"
    wrapper = next(
        l for l in model.layers if l is base or (isinstance(l, InferenceMode) and l.layer is base)
    )
    model_ref = weakref.ref(model)  # _PARTS holds this function: it must not keep the model

    def forward(embeddings, row):
        injected = tf.cast(embeddings, embedding.compute_dtype)  # mixed precision: float16

        def backbone(tokens, **kwargs):
            return base._run_through_graph(tokens, operation_fn=lambda op: (
                (lambda *a, **k: injected) if op is embedding else op))

        def outer(op):
            if op is preprocessing:
                return lambda *a, **k: row
            return backbone if op is wrapper else op

        texts = tf.fill([tf.shape(embeddings)[0]], "")  # unused: "preprocessing" gives `row`
        return model_ref()._run_through_graph(texts, operation_fn=outer)

    @tf.function(reduce_retracing=True)
    def gradients(embeddings, row, classes):
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            score = _score(tf.cast(forward(embeddings, row), tf.float32), classes)
        return tf.cast(tape.gradient(score, embeddings), tf.float32)

    return _EmbeddingParts(preprocessing, embedding, gradients, tokenizer)


def _text_integrated_gradients(parts, texts, classes, steps, baseline, batch_size):
    """Integrated gradients on the token embeddings, summed over the embedding axis.

    The path runs from a baseline that keeps the special tokens ([CLS], [SEP],
    padding) and replaces every real token's embedding by the pad token's (or by
    the constant `baseline`) to the real embeddings; position and segment
    embeddings are unchanged. Returns `(word pairs, (N, tokens) attributions)`.
    """
    tokens = parts.preprocessing(tf.constant(texts))
    ids = keras.ops.convert_to_numpy(tokens["token_ids"])
    special = list(getattr(parts.tokenizer, "special_token_ids", None) or [])
    real = keras.ops.convert_to_numpy(tokens["padding_mask"]).astype(bool) & ~np.isin(ids,
                                                                                     special)
    embedded = keras.ops.convert_to_numpy(parts.embedding(tokens["token_ids"])).astype("float32")
    if baseline is None:
        pad = getattr(parts.tokenizer, "pad_token_id", 0) or 0
        reference = keras.ops.convert_to_numpy(parts.embedding(np.full(ids.shape[1:], pad)[None]))
    else:
        reference = np.full(embedded.shape[1:], baseline, "float32")[None]
    reference = np.where(real[..., None], reference, embedded).astype("float32")
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype="float32")
    weights = np.full(steps + 1, 1.0 / steps, "float32")
    weights[[0, -1]] /= 2  # trapezoidal rule
    attributions = np.zeros(ids.shape, "float32")
    # Chunks of one size (the last one padded with copies of the path's end): one trace of
    # `parts.gradients` serves every chunk and text (33 points in chunks of 32 would trace it
    # twice, for 32 and 1).
    size = -(-len(alphas) // -(-len(alphas) // batch_size))
    pairs = []
    for i, text in enumerate(texts):
        path = reference[i] + alphas[:, None, None] * (embedded[i] - reference[i])
        path = np.concatenate([path, np.repeat(path[-1:], -len(path) % size, axis=0)])
        row = {k: tf.repeat(v[i:i + 1], size, axis=0) for k, v in tokens.items()}
        grads = [parts.gradients(tf.constant(path[start:start + size]), row,
                                 np.full(size, classes[i])).numpy()
                 for start in range(0, len(path), size)]
        average = np.tensordot(weights, np.concatenate(grads)[:len(alphas)], axes=1)
        attributions[i] = ((embedded[i] - reference[i]) * average).sum(axis=-1)
        pairs.append(_word_pairs(parts.tokenizer, text, ids[i][real[i]], attributions[i][real[i]]))
    return pairs, attributions


def _word_pairs(tokenizer, text, ids, scores):
    """Token scores merged into the text's whitespace words (a word's pieces are summed).

    Words past the sequence length were not seen by the model: they score 0.
    When the tokenizer does not split the text word by word (e.g. byte-pair
    encoders that mark a leading space), the tokenizer's own tokens come back.
    """
    words = text.split()
    pieces = tokenizer(tf.constant(words)) if words else []
    pieces = pieces.to_list() if hasattr(pieces, "to_list") else list(pieces)
    pieces = [[int(t) for t in keras.ops.convert_to_numpy(p).reshape(-1)] for p in pieces]
    flat = [t for p in pieces for t in p]
    if flat[:len(ids)] != [int(t) for t in ids]:
        return [(str(tokenizer.id_to_token(int(t))), float(s)) for t, s in zip(ids, scores)]
    pairs, k = [], 0
    for word, piece in zip(words, pieces):
        pairs.append((word, float(np.sum(scores[k:k + len(piece)]))))
        k += len(piece)
    return pairs


# --- helpers -------------------------------------------------------------------------------


def _is_text(model, inputs):
    if isinstance(inputs, str):
        return True
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str):
        return True
    dtype = getattr(getattr(model, "inputs", [None])[0], "dtype", None)
    return dtype == "string"


def _text(text):
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _predict(model, x, batch_size):
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        if chunk.dtype == object:
            chunk = tf.constant([str(t) for t in chunk])
        if isinstance(model, keras.Model):
            y = model.predict_on_batch(chunk)
        else:
            y = model(chunk)
        outputs.append(np.asarray(y, dtype="float32").reshape(len(chunk), -1))
    return np.concatenate(outputs)


def _predicted(probabilities):
    if probabilities.shape[-1] == 1:
        return (probabilities[:, 0] >= 0.5).astype(int)
    return probabilities.argmax(axis=-1)


def _classes(probabilities, class_index, start, count):
    if class_index is None:
        return _predicted(probabilities)
    return _requested(class_index, start, count, probabilities.shape[-1])


def _requested(class_index, start, count, outputs):
    """`class_index` (an int, or one per input) for inputs `start`..`start + count`, checked
    against a model with `outputs` outputs (a single sigmoid explains classes 0 and 1)."""
    if np.ndim(class_index) == 0:
        classes = np.full(count, int(class_index))
    else:
        classes = np.asarray(class_index, dtype=int)[start:start + count]
    width = max(outputs or 2, 2)
    if classes.min() < 0 or classes.max() >= width:
        raise ValueError(
            f"explain(): class_index must be in [0, {width}), received {class_index!r}."
        )
    return classes


def _score(outputs, classes):
    """The explained class's output (a single sigmoid: p for class 1, -p for class 0)."""
    classes = tf.convert_to_tensor(classes)
    if outputs.shape[-1] == 1:
        return outputs[:, 0] * tf.where(tf.equal(classes, 1), 1.0, -1.0)
    return tf.gather(outputs, classes, axis=1, batch_dims=1)


def _class_scores(probabilities, cls):
    if probabilities.shape[-1] == 1:
        return probabilities[:, 0] if cls == 1 else 1.0 - probabilities[:, 0]
    return probabilities[:, cls]


def _normalize(maps):
    maps = np.maximum(np.asarray(maps, dtype="float32"), 0)
    top = maps.reshape(len(maps), -1).max(axis=1)
    return maps / np.where(top > 0, top, 1.0)[:, None, None]


def _spearman(a, b):
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)
