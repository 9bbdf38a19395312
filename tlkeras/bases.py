"""Bases: deciding what a `base` is, for every kind, in one place.

`resolve_base(base, input_shape, weights)` turns any accepted `base` into a
`ResolvedBase` (the base layer, its preprocessing, the model's input shape,
whether it reads text), and `base_features` assembles the input-to-"features"
part of a transfer model from it (see `tlkeras.anatomy` for the layout and the
inference-mode rule). `tlkeras.build_transfer_model` is these two calls plus
the head. Accepted kinds:

- a `keras.applications` name from `tlkeras.backbones.list_backbones()`;
- a `keras.Model` (or layer) you built: it receives raw [0, 255] pixels;
- a `.keras` file holding a base model, or a whole transfer model saved by
  `model.save("x.keras")`, image or text (its base and preprocessing, or its
  backbone and tokenizer, are taken out);
- `"hub:<handle>"`, a TF Hub / Kaggle URL or a SavedModel directory;
- a KerasHub preset name, handle or directory (image or text).

Example:

>>> import os, tempfile, keras, tlkeras
>>> base = keras.applications.MobileNetV2(
...     input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
>>> path = os.path.join(tempfile.mkdtemp(), "base.keras")
>>> base.save(path)
>>> resolved = tlkeras.resolve_base(path)
>>> resolved.input_shape, resolved.preprocessing, resolved.is_text
((32, 32, 3), 'none', False)
>>> model = tlkeras.build_transfer_model(path, num_classes=3)
>>> model.output_shape
(None, 3)
"""

import contextlib
import os
import typing

import keras

from tlkeras import anatomy, backbones, hub, text
from tlkeras import weights as weights_module

__all__ = ["ResolvedBase", "WeightsDownloadError", "base_features", "resolve_base",
           "weights_info"]


class WeightsDownloadError(OSError):
    """Raised when pretrained weights cannot be downloaded (e.g. offline)."""


class ResolvedBase(typing.NamedTuple):
    """What the assembly of a transfer model needs to know about its base."""

    layer: keras.layers.Layer  # the base (a keras.Model for every kind but a hub module)
    preprocessing: object  # an `ImagePreprocessing` mode, a preprocessing layer, or (text) None
    # or the KerasHub text preprocessor taken from a saved text model
    input_shape: tuple  # the model's input: (height, width, 3); for text (length,) or None
    is_text: bool  # whether the model reads raw strings (a KerasHub text preset)
    source: object = None  # the `base` argument (a KerasHub text preset builds its tokenizer)


def resolve_base(base, input_shape=None, weights="imagenet"):
    """Resolves any kind of `base` that `build_transfer_model` accepts (see the module doc).

    Args:
        base: a backbone name, a `keras.Model`, a `.keras` file, a TF Hub
            handle or SavedModel directory, or a KerasHub preset.
        input_shape: the model's input shape; defaults to the base's own.
        weights: `"imagenet"` (the pretrained weights of a name, hub module or
            preset; ignored for a model or `.keras` file, which carry their
            own), `None` (random), or a path to a Keras file holding the
            base's weights (see `tlkeras.weights`).

    Returns:
        A `ResolvedBase`.

    >>> import tlkeras
    >>> resolved = tlkeras.resolve_base("MobileNetV2", (32, 32, 3), weights=None)
    >>> resolved.layer.name, resolved.preprocessing, resolved.input_shape
    ('mobilenetv2_1.00_32', 'tf', (32, 32, 3))
    """
    if isinstance(base, os.PathLike):
        base = os.fspath(base)
    path_weights = isinstance(weights, (str, os.PathLike)) and weights != "imagenet"
    if isinstance(base, keras.layers.Layer):
        if path_weights:
            weights_module.load_base_weights(base, weights)
        return ResolvedBase(base, "none", _input_shape_of(base, input_shape), False, base)
    if not isinstance(base, str):
        raise TypeError(
            "build_transfer_model: expected `base` to be a backbone name, a keras.Model, a .keras "
            "file, a hub handle or a KerasHub preset; received "
            f"{type(base).__name__}.")
    if backbones.exists(base):
        spec = backbones.get(base)
        layer = _build_registry_base(spec, input_shape, weights)
        return ResolvedBase(layer, spec.preprocessing, tuple(layer.input_shape[1:]), False, base)
    if base.endswith(".keras"):
        return _resolve_keras_file(base, input_shape, weights if path_weights else None)
    if hub.is_hub_handle(base):
        layer = hub.load_hub_layer(base, input_shape=input_shape, weights=weights)
        return ResolvedBase(layer, "unit", tuple(input_shape), False, base)
    backbone = hub.load_keras_hub_backbone(base, load_weights=weights is not None)
    if path_weights:
        weights_module.load_base_weights(backbone, weights)
    if hub.is_text_backbone(backbone):
        return ResolvedBase(backbone, None, input_shape and tuple(input_shape), True, base)
    converter = hub.image_converter(base, name=anatomy.PREPROCESSING)
    if input_shape is None:
        input_shape = (*(converter.image_size or (None, None)), 3)
    return ResolvedBase(backbone, converter, tuple(input_shape), False, base)


def base_features(resolved, *, pooling="avg", augmentation=None):
    """The input-to-"features" part of a transfer model around a `ResolvedBase`.

    Returns `(inputs, features, base)`; `base` is the layer `unfreeze` works on.
    """
    if resolved.is_text:
        if augmentation is not None:
            raise ValueError(
                f"build_transfer_model({resolved.source!r}): augmentation is for images, not "
                "text.")
        return text.text_features(resolved.layer, resolved.source,
                                  input_shape=resolved.input_shape, pooling=pooling,
                                  preprocessor=resolved.preprocessing)
    output = getattr(resolved.layer, "output", None)
    if isinstance(output, keras.KerasTensor) and len(output.shape) == 3:
        # vision transformers: (batch, tokens, dim), pooled like text
        if pooling not in ("avg", "max", None):
            raise ValueError(f"Expected pooling in ('avg', 'max', None), received {pooling!r}.")
        pooling = text.TokenPooling(pooling or "first", name=anatomy.FEATURES)
    inputs, features = anatomy.image_features(
        resolved.layer, resolved.input_shape, preprocessing=resolved.preprocessing,
        pooling=pooling, augmentation=augmentation)
    return inputs, features, resolved.layer


def weights_info(name):
    """Where Keras downloads ImageNet weights for backbone `name` from, and caches them.

    Returns a dict with `file_name`, `url` and `cache_path` (put the file there
    to use `weights="imagenet"` offline). Nothing is downloaded.
    """
    spec = backbones.get(name)

    class _Stop(Exception):
        pass

    def fake_get_file(*args, **kwargs):
        raise _Stop

    with _recording_get_file(fake_get_file) as calls:
        try:
            spec.build(weights="imagenet")
        except _Stop:
            pass
    if not calls:
        raise RuntimeError(f"Keras did not ask for a weights file for {spec.name}.")
    return calls[-1]


def _resolve_keras_file(path, input_shape, weights):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"build_transfer_model: no such .keras file: base={path!r}.")
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as error:
        raise ValueError(
            f"build_transfer_model: cannot load base={path!r} as a Keras model "
            f"({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''})."
            " Expected a .keras file saved by model.save().") from error
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"build_transfer_model: expected {path!r} to hold a base model or a whole transfer "
            f"model; it holds a {type(model).__name__}.")
    if not anatomy.is_transfer_model(model):
        if _has_string_input(model):
            raise ValueError(
                f"build_transfer_model: {path!r} holds a model on strings that is not a tlkeras "
                "transfer model; pass its KerasHub preset as base instead.")
        resolved = resolve_base(model, input_shape, weights)
        return resolved._replace(source=path)
    base = anatomy.get_base(model)
    if _has_string_input(model):  # a text transfer model: its backbone and its tokenizer
        preprocessor = anatomy.get_preprocessing(model).preprocessor
        if weights is not None:
            weights_module.load_base_weights(base, weights)
        return ResolvedBase(base, preprocessor, input_shape and tuple(input_shape), True, path)
    if weights is not None:
        weights_module.load_base_weights(base, weights)
    shape = tuple(input_shape) if input_shape is not None else tuple(model.input_shape[1:])
    return ResolvedBase(base, anatomy.get_preprocessing(model), shape, False, path)


def _has_string_input(model):
    return any(tensor.dtype == "string" for tensor in model.inputs)


def _input_shape_of(base, input_shape):
    if input_shape is not None:
        return tuple(input_shape)
    try:
        return tuple(base.input_shape[1:])
    except (AttributeError, ValueError):
        raise ValueError(
            f"Cannot tell the input shape of base {base.name!r}; pass input_shape=(height, width, 3)."
        ) from None


def _build_registry_base(spec, input_shape, weights):
    if weights is None or weights == "imagenet":
        with _recording_get_file() as calls:
            try:
                return spec.build(input_shape, weights)
            except Exception as error:
                if not calls or os.path.isfile(calls[-1]["cache_path"]):
                    raise
                info = calls[-1]
                raise WeightsDownloadError(
                    f"Could not download ImageNet weights for {spec.name}: Keras wanted the file "
                    f"{info['file_name']!r} from {info['url']} ({type(error).__name__}: {error}).\n"
                    "Offline, do one of:\n"
                    f"  1. download that file elsewhere and pass weights='/path/to/{info['file_name']}'"
                    " to build_transfer_model (or --weights PATH on the command line), or\n"
                    f"  2. put it at {info['cache_path']} (the Keras cache; set KERAS_HOME to move it)"
                    " and keep weights='imagenet'."
                ) from error
    base = spec.build(input_shape, None)
    weights_module.load_base_weights(base, weights)
    return base


@contextlib.contextmanager
def _recording_get_file(replacement=None):
    """Records every `get_file` call keras.applications makes while active."""
    from keras.src.backend import config
    from keras.src.utils import file_utils

    original, calls = file_utils.get_file, []

    def wrapper(fname=None, origin=None, *args, **kwargs):
        cache_dir = os.path.expanduser(kwargs.get("cache_dir") or config.keras_home())
        if not os.access(cache_dir, os.W_OK):  # as Keras does
            cache_dir = os.path.join("/tmp", ".keras")
        cache_path = os.path.join(cache_dir, kwargs.get("cache_subdir", "datasets"), fname)
        calls.append({"file_name": fname, "url": origin, "cache_path": cache_path})
        return (replacement or original)(fname, origin, *args, **kwargs)

    file_utils.get_file = wrapper
    try:
        yield calls
    finally:
        file_utils.get_file = original
