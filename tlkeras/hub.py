"""TF Hub SavedModels and KerasHub presets as transfer-learning bases.

`HubLayer` wraps a TF2 SavedModel (a TF Hub / Kaggle handle or a local
directory) as a Keras 3 layer whose variables are ordinary Keras weights, so
any Keras optimizer fine-tunes them. The loaders here (`load_hub_layer`,
`load_keras_hub_backbone`, `image_converter`) are what `tlkeras.resolve_base`
uses for these kinds of `base`:

- `"hub:<handle>"`, a `https://tfhub.dev/...` or
  `https://www.kaggle.com/models/...` URL, or a SavedModel directory (holding
  `saved_model.pb`). TF Hub image modules expect pixels in [0, 1]: the model's
  "preprocessing" layer rescales the raw [0, 255] input accordingly
  (`ImagePreprocessing("unit")`). `input_shape` is required. The module runs
  in inference mode (`arguments={"training": False}`), like every tlkeras base.
- a KerasHub preset name (`"resnet_18_imagenet"`), handle (`"hf://..."`,
  `"kaggle://..."`) or local preset directory, including Hugging Face and timm
  checkpoints that KerasHub converts. Image presets get the preset's own
  `ImageConverter` as the "preprocessing" layer (it maps [0, 255] pixels to
  what the backbone expects). `weights=None` initializes the backbone randomly.
  Token outputs of vision transformers are pooled like text ("avg": mean of
  all tokens, None: the first, [CLS] token). Text presets build a model on raw
  strings; see `tlkeras.text`.

Handles are resolved and cached the way the `tensorflow_hub` package does it
(which tlkeras does not need): under `$TFHUB_CACHE_DIR` (default
`<tempdir>/tfhub_modules`), in a folder named by the SHA-1 of the handle.
Offline, put the unpacked SavedModel there, or pass its local path.

Example:

>>> import tlkeras
>>> layer = tlkeras.HubLayer("/path/to/saved_model", trainable=True)  # doctest: +SKIP
>>> model = tlkeras.build_transfer_model(
...     "hub:https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5",
...     num_classes=5, input_shape=(224, 224, 3))  # doctest: +SKIP
"""

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request

import keras
import tensorflow as tf

from keras.src.saving import serialization_lib

from tlkeras import anatomy

_URL_PREFIXES = ("https://", "http://")
# Handles this process has loaded: rebuilding a model from its config (clone_model,
# Model.from_config, tuners) may reload these even in safe mode.
_TRUSTED_HANDLES = set()


def cache_dir():
    """The TF Hub cache folder: `$TFHUB_CACHE_DIR`, or `<tempdir>/tfhub_modules`."""
    return os.environ.get("TFHUB_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "tfhub_modules")


def module_dir(handle):
    """Where `tensorflow_hub` (and tlkeras) caches the unpacked SavedModel of URL `handle`."""
    return os.path.join(cache_dir(), hashlib.sha1(handle.encode("utf8")).hexdigest())


def resolve(handle):
    """Returns the local SavedModel directory for `handle`, downloading it if needed.

    `handle` is a local directory, or a URL (`https://tfhub.dev/...`,
    `https://www.kaggle.com/models/...`), optionally prefixed with `"hub:"`;
    a bare `publisher/model/.../version` means `https://tfhub.dev/<handle>`.
    URLs are fetched as `<url>?tf-hub-format=compressed` (a .tar.gz) and
    unpacked into `module_dir(url)`, which is reused on later calls.

    Example:

    >>> resolve("hub:https://tfhub.dev/google/x/1")  # doctest: +SKIP
    '/tmp/tfhub_modules/...'
    """
    handle = os.fspath(handle)
    if handle.startswith("hub:"):
        handle = handle[len("hub:") :]
    if os.path.isdir(handle):
        if not _is_saved_model(handle):
            raise ValueError(
                f"HubLayer: directory {handle!r} holds no saved_model.pb (not a SavedModel)."
            )
        return handle
    if not handle.startswith(_URL_PREFIXES):
        if os.path.isabs(handle) or handle.startswith("."):
            raise FileNotFoundError(f"HubLayer: no such SavedModel directory: {handle!r}.")
        handle = "https://tfhub.dev/" + handle
    target = module_dir(handle)
    if _is_saved_model(target):
        return target
    try:
        _download(handle, target)
    except (OSError, tarfile.TarError) as error:
        raise OSError(
            f"Could not download the TF Hub module {handle!r} ({type(error).__name__}: {error}).\n"
            "Offline, do one of:\n"
            f"  1. put the unpacked SavedModel (saved_model.pb, variables/) in {target}\n"
            "     (the TF Hub cache: the SHA-1 of the handle under $TFHUB_CACHE_DIR, "
            f"now {cache_dir()}), or\n"
            "  2. download and unpack it elsewhere and pass its local directory instead of the\n"
            "     handle."
        ) from error
    return target


def _is_saved_model(path):
    return os.path.isfile(os.path.join(path, "saved_model.pb")) or os.path.isfile(
        os.path.join(path, "saved_model.pbtxt")
    )


def _download(url, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", dir=os.path.dirname(target))
    try:
        separator = "&" if "?" in url else "?"
        with urllib.request.urlopen(
            url + separator + "tf-hub-format=compressed", timeout=60
        ) as response:
            with tarfile.open(fileobj=response, mode="r|*") as archive:
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                archive.extractall(tmp, **safe)  # "data": no absolute paths, links out, devices
        if not _is_saved_model(tmp):
            raise OSError(f"the archive from {url} holds no saved_model.pb")
        if os.path.isdir(target):  # a broken earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@keras.saving.register_keras_serializable(package="tlkeras")
class HubLayer(keras.layers.Layer):
    """A TF2 SavedModel (TF Hub handle or directory) as a fine-tunable Keras 3 layer.

    Unlike `hub.KerasLayer` (which does not work in Keras 3 models) and
    `keras.layers.TFSMLayer` (whose weights Adam cannot train), the module's
    variables become ordinary Keras weights: `layer.trainable_weights` are
    what any Keras optimizer updates, `trainable=False` freezes them.

    Args:
        handle: a SavedModel directory, or a TF Hub / Kaggle URL (optionally
            `"hub:"`-prefixed); see `resolve`.
        trainable: whether fine-tuning updates the module's variables. A frozen
            layer always runs the module in inference mode.
        signature: name of a serving signature to call (e.g.
            `"serving_default"`) instead of the module's `__call__`.
        output_key: key to pick from a dict of outputs.
        arguments: dict of extra keyword arguments for every call;
            `{"training": False}` keeps the module in inference mode always.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    The `training` argument reaches modules whose `__call__` accepts it (e.g.
    for BatchNormalization and dropout). Floating inputs are cast to the dtype
    the module expects (float16 under mixed precision -> float32) and outputs to
    the layer's compute dtype. TF Hub image modules expect float pixels in [0, 1].

    Saving: a model holding a `HubLayer` saves to `.keras`; loading it reloads
    the SavedModel from `handle` (so the handle must still resolve), restores
    the fine-tuned weights, and needs `safe_mode=False` because a SavedModel
    carries its own graph code; only handles this process has already loaded
    (so rebuilding a model from its config, as `clone_model` does) are
    trusted in safe mode. For a self-contained
    artifact export the model as a SavedModel (`tlkeras.export_model(model,
    dir, formats=("saved_model", "tflite"))`, or `model.export(path)`).

    Example:

    >>> import keras, tlkeras
    >>> layer = tlkeras.HubLayer("/tmp/my_saved_model", trainable=True)  # doctest: +SKIP
    >>> inputs = keras.Input((32, 32, 3))
    >>> outputs = keras.layers.Dense(2)(layer(inputs))  # doctest: +SKIP
    """

    def __init__(
        self, handle, *, trainable=False, signature=None, output_key=None, arguments=None, **kwargs
    ):
        kwargs.setdefault("autocast", False)  # casting is done in `call`, to what the module wants
        super().__init__(trainable=trainable, **kwargs)
        handle = os.fspath(handle)
        self.handle = os.path.abspath(handle) if os.path.isdir(handle) else handle
        self.signature = signature
        self.output_key = output_key
        self.arguments = dict(arguments or {})
        self._module = tf.saved_model.load(resolve(self.handle))
        _TRUSTED_HANDLES.add(self.handle)
        self._func, self._is_signature = self._pick_function(signature)
        concrete = _concrete_functions(self._func)
        self._accepts_training = not self._is_signature and "training" in _parameter_names(
            self._func
        )
        args, kw = concrete[0].structured_input_signature
        self._input_spec_tf = kw if self._is_signature else (args[0] if args else None)
        seen = set()
        for fn in concrete:
            for variable in list(fn.trainable_variables) + list(fn.variables):
                if id(variable) not in seen:
                    seen.add(id(variable))
                    self._add_module_variable(variable)
        self._build_at_init()

    def _pick_function(self, signature):
        module = self._module
        if signature is None:
            if callable(module):
                return module.__call__, False
            for name in ("serve", "serving_default"):
                if hasattr(module, name):
                    return getattr(module, name), False
            signature = "serving_default"
        if signature in module.signatures:
            return module.signatures[signature], True
        if hasattr(module, signature) and callable(getattr(module, signature)):
            return getattr(module, signature), False
        raise ValueError(
            f"HubLayer({self.handle!r}): the SavedModel has no signature or function "
            f"{signature!r}. Signatures: {sorted(module.signatures)}; it is"
            f"{'' if callable(module) else ' not'} callable."
        )

    def _add_module_variable(self, variable):
        # Keras names cannot hold "/", and optimizers build name scopes from them,
        # which cannot hold ":" (the TFSMLayer + Adam failure).
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", re.sub(r":\d+$", "", variable.name))
        wrapped = keras.Variable(
            initializer=variable,
            shape=variable.shape,
            dtype=variable.dtype,
            trainable=variable.trainable,
            name=name,
        )
        self._track_variable(wrapped)

    def call(self, inputs, training=None):
        inputs = _cast_to_spec(inputs, self._input_spec_tf)
        kwargs = dict(self.arguments)
        if self._is_signature:
            if not isinstance(inputs, dict):
                names = list(self._input_spec_tf)
                if len(names) != 1:
                    raise ValueError(
                        f"HubLayer({self.handle!r}): signature {self.signature!r} takes inputs "
                        f"{names}; pass a dict with these keys."
                    )
                inputs = {names[0]: inputs}
            outputs = self._func(**inputs, **kwargs)
        elif self._accepts_training:
            training = kwargs.pop("training", training)  # arguments={"training": False} pins it
            if isinstance(training, tf.Tensor):
                training = tf.logical_and(training, self.trainable)
                outputs = tf.cond(
                    training,
                    lambda: self._func(inputs, training=True, **kwargs),
                    lambda: self._func(inputs, training=False, **kwargs),
                )
            else:
                outputs = self._func(inputs, training=bool(training) and self.trainable, **kwargs)
        else:
            outputs = self._func(inputs, **kwargs)
        if self.output_key is not None:
            if not isinstance(outputs, dict) or self.output_key not in outputs:
                keys = sorted(outputs) if isinstance(outputs, dict) else "a single tensor"
                raise ValueError(
                    f"HubLayer({self.handle!r}): output_key={self.output_key!r} not in "
                    f"outputs {keys}."
                )
            outputs = outputs[self.output_key]
        elif self._is_signature and isinstance(outputs, dict) and len(outputs) == 1:
            outputs = next(iter(outputs.values()))
        return tf.nest.map_structure(self._cast_output, outputs)

    def _cast_output(self, x):
        return tf.cast(x, self.compute_dtype) if x.dtype.is_floating else x

    def get_config(self):
        return {
            **super().get_config(),
            "handle": self.handle,
            "signature": self.signature,
            "output_key": self.output_key,
            "arguments": self.arguments,
        }

    @classmethod
    def from_config(cls, config):
        trusted = config.get("handle") in _TRUSTED_HANDLES
        if not trusted and serialization_lib.in_safe_mode() is not False:
            raise ValueError(
                f"Loading a HubLayer reloads the SavedModel {config.get('handle')!r}, which may "
                "run arbitrary graph code, so Keras' safe mode forbids it. If you trust it, load "
                "with keras.models.load_model(path, safe_mode=False) (or call "
                "keras.config.enable_unsafe_deserialization())."
            )
        return cls(**config)


def _concrete_functions(func):
    if hasattr(func, "concrete_functions"):
        return list(func.concrete_functions)
    if hasattr(func, "_list_all_concrete_functions_for_serialization"):
        return list(func._list_all_concrete_functions_for_serialization())
    return [func]


def _parameter_names(func):
    function_type = getattr(func, "function_type", None)
    return set(function_type.parameters) if function_type is not None else set()


def _cast_to_spec(inputs, spec):
    def cast(x, s):
        x = tf.convert_to_tensor(x)
        if (
            isinstance(s, tf.TensorSpec)
            and s.dtype.is_floating
            and x.dtype != s.dtype
            and (x.dtype.is_floating or x.dtype.is_integer)
        ):
            return tf.cast(x, s.dtype)
        return x

    if isinstance(spec, dict) and not isinstance(inputs, dict):
        spec = next(iter(spec.values())) if len(spec) == 1 else None
    try:
        return tf.nest.map_structure(cast, inputs, spec)
    except (TypeError, ValueError):  # structures differ: cast what we can to float32
        return tf.nest.map_structure(lambda x: cast(x, tf.TensorSpec(None, tf.float32)), inputs)


def is_hub_handle(base):
    """Whether `base` names a TF Hub module or a SavedModel directory (not a KerasHub preset)."""
    base = os.fspath(base)
    if base.startswith("hub:"):
        return True
    if os.path.isdir(base):
        return _is_saved_model(base)
    return base.startswith(_URL_PREFIXES)


def load_hub_layer(handle, *, input_shape=None, weights="imagenet"):
    """The `HubLayer` base for TF Hub handle or SavedModel directory `handle` (inference mode)."""
    if weights not in ("imagenet", None) and weights is not True:
        raise ValueError(
            f"build_transfer_model({handle!r}): a TF Hub module carries its own weights; "
            f"weights={weights!r} is not supported (use the default)."
        )
    if weights is None:
        raise ValueError(
            f"build_transfer_model({handle!r}): weights=None (random initialization) is not "
            "supported for TF Hub modules."
        )
    if input_shape is None:
        raise ValueError(
            f"build_transfer_model({handle!r}): pass input_shape=(height, width, 3) for a TF Hub "
            "image module (see its documentation for the size it was trained on)."
        )
    # Inference mode always, like every tlkeras base: BatchNormalization statistics stay
    # frozen even once unfrozen (Keras passes training=True to every layer in fit()).
    return HubLayer(handle, arguments={"training": False}, name="hub_layer")


def load_keras_hub_backbone(preset, *, load_weights=True):
    """The `keras_hub.models.Backbone` of KerasHub `preset` (name, handle or local directory)."""
    import keras_hub

    try:
        return keras_hub.models.Backbone.from_preset(preset, load_weights=load_weights)
    except Exception as error:
        raise ValueError(
            f"build_transfer_model: {preset!r} is not a keras.applications name "
            "(tlkeras.backbones.list_backbones()), a .keras file, a TF Hub handle ('hub:<handle>' "
            "or a SavedModel directory) or a loadable KerasHub preset "
            f"({type(error).__name__}: {error})."
        ) from error


def is_text_backbone(backbone):
    """Whether KerasHub `backbone` reads token ids (a text backbone)."""
    return isinstance(backbone.input, dict) and "token_ids" in backbone.input


def image_converter(preset, *, name=anatomy.PREPROCESSING):
    """The preset's own `ImageConverter` (maps [0, 255] pixels to what its backbone expects)."""
    import keras_hub

    converter = None
    if _has_image_converter(preset):
        converter = keras_hub.layers.ImageConverter.from_preset(preset, name=name)
    if converter is None:
        raise ValueError(
            f"build_transfer_model({preset!r}): the preset has no image converter, so tlkeras "
            "cannot tell how it expects pixels. Save one with keras_hub.layers.ImageConverter("
            "image_size=..., scale=..., offset=...).save_to_preset(dir)."
        )
    return converter


def _has_image_converter(preset):
    from keras_hub.src.utils import preset_utils

    loader = preset_utils.get_preset_loader(preset)
    if isinstance(loader, preset_utils.KerasPresetLoader):
        return preset_utils.check_file_exists(preset, preset_utils.IMAGE_CONVERTER_CONFIG_FILE)
    return True  # HF / timm loaders build it from the checkpoint's config (or return None)
