"""The backbone registry: every architecture in `keras.applications` by name.

Each entry knows its constructor, default and minimum input size, pooled
feature dimension, preprocessing mode and how its layers group into blocks.

Example:

>>> from tlkeras import backbones
>>> spec = backbones.get("efficientnetv2b0")
>>> spec.name, spec.default_size, spec.preprocessing
('EfficientNetV2B0', 224, 'none')
>>> len(backbones.list_backbones())
40

Block boundaries per family (what `unfreeze(model, n, unit="blocks")` counts
from the top; layers before the first block form `"stem"`, layers after the
last one `"top"`):

| family | a block is | layer names |
| --- | --- | --- |
| ResNet, ResNetV2, DenseNet | one residual / dense unit | `conv4_block3_*`; DenseNet transitions `pool3_*` |
| VGG, Xception | one stage / one Xception block | `block5_*` |
| MobileNet | one depthwise-separable unit | `conv_dw_7*`, `conv_pw_7*` |
| MobileNetV2, MobileNetV3 | one inverted-residual block | `block_12_*`, `expanded_conv_10_*` |
| EfficientNet, EfficientNetV2 | one MBConv / Fused-MBConv block | `block6a_*` |
| ConvNeXt | one ConvNeXt block or downsampling step | `*_stage_2_block_4_*` |
| InceptionV3 | one Inception module, ending at `mixedN` | |
| InceptionResNetV2 | one module, ending at `mixed_*` or `block*_N_ac` | |
| NASNet | one cell, ending at its `*_concat_*` | |
"""

import dataclasses
import re

import keras

# family -> (keras.applications module, preprocessing mode, block regex, regex marks block end)
_FAMILIES = {
    "convnext": ("convnext", "none", r"_(stage_\d+_block_\d+|downsampling_block_\d+)", False),
    "densenet": ("densenet", "torch", r"^(conv\d+_block\d+|pool\d+)_", False),
    "efficientnet": ("efficientnet", "none", r"^(block\d+[a-z])_", False),
    "efficientnet_v2": ("efficientnet_v2", "none", r"^(block\d+[a-z])_", False),
    "inception_resnet_v2": (
        "inception_resnet_v2",
        "tf",
        r"^(mixed_\w+|block\d+_\d+_ac|block8_10|conv_7b_ac)$",
        True,
    ),
    "inception_v3": ("inception_v3", "tf", r"^(mixed\d+)$", True),
    "mobilenet": ("mobilenet", "tf", r"^conv_(?:dw|pw)_(\d+)", False),
    "mobilenet_v2": ("mobilenet_v2", "tf", r"^(block_\d+|expanded_conv)_", False),
    "mobilenet_v3": ("mobilenet_v3", "none", r"^(expanded_conv(?:_\d+)?)_", False),
    "nasnet": ("nasnet", "tf", r"^((?:normal|reduction)_concat_\w+)$", True),
    "resnet": ("resnet", "caffe", r"^(conv\d+_block\d+)_", False),
    "resnet_v2": ("resnet_v2", "tf", r"^(conv\d+_block\d+)_", False),
    "vgg16": ("vgg16", "caffe", r"^(block\d+)_", False),
    "vgg19": ("vgg19", "caffe", r"^(block\d+)_", False),
    "xception": ("xception", "tf", r"^(block\d+)_", False),
}

# name: (family, default input size, minimum input size with weights=None, pooled feature dim)
_ARCHITECTURES = {
    "ConvNeXtTiny": ("convnext", 224, 32, 768),
    "ConvNeXtSmall": ("convnext", 224, 32, 768),
    "ConvNeXtBase": ("convnext", 224, 32, 1024),
    "ConvNeXtLarge": ("convnext", 224, 32, 1536),
    "ConvNeXtXLarge": ("convnext", 224, 32, 2048),
    "DenseNet121": ("densenet", 224, 32, 1024),
    "DenseNet169": ("densenet", 224, 32, 1664),
    "DenseNet201": ("densenet", 224, 32, 1920),
    "EfficientNetB0": ("efficientnet", 224, 32, 1280),
    "EfficientNetB1": ("efficientnet", 240, 32, 1280),
    "EfficientNetB2": ("efficientnet", 260, 32, 1408),
    "EfficientNetB3": ("efficientnet", 300, 32, 1536),
    "EfficientNetB4": ("efficientnet", 380, 32, 1792),
    "EfficientNetB5": ("efficientnet", 456, 32, 2048),
    "EfficientNetB6": ("efficientnet", 528, 32, 2304),
    "EfficientNetB7": ("efficientnet", 600, 32, 2560),
    "EfficientNetV2B0": ("efficientnet_v2", 224, 32, 1280),
    "EfficientNetV2B1": ("efficientnet_v2", 240, 32, 1280),
    "EfficientNetV2B2": ("efficientnet_v2", 260, 32, 1408),
    "EfficientNetV2B3": ("efficientnet_v2", 300, 32, 1536),
    "EfficientNetV2S": ("efficientnet_v2", 384, 32, 1280),
    "EfficientNetV2M": ("efficientnet_v2", 480, 32, 1280),
    "EfficientNetV2L": ("efficientnet_v2", 480, 32, 1280),
    "InceptionResNetV2": ("inception_resnet_v2", 299, 75, 1536),
    "InceptionV3": ("inception_v3", 299, 75, 2048),
    "MobileNet": ("mobilenet", 224, 32, 1024),
    "MobileNetV2": ("mobilenet_v2", 224, 32, 1280),
    "MobileNetV3Large": ("mobilenet_v3", 224, 32, 960),
    "MobileNetV3Small": ("mobilenet_v3", 224, 32, 576),
    "NASNetLarge": ("nasnet", 331, 32, 4032),
    "NASNetMobile": ("nasnet", 224, 32, 1056),
    "ResNet50": ("resnet", 224, 32, 2048),
    "ResNet101": ("resnet", 224, 32, 2048),
    "ResNet152": ("resnet", 224, 32, 2048),
    "ResNet50V2": ("resnet_v2", 224, 32, 2048),
    "ResNet101V2": ("resnet_v2", 224, 32, 2048),
    "ResNet152V2": ("resnet_v2", 224, 32, 2048),
    "VGG16": ("vgg16", 224, 32, 512),
    "VGG19": ("vgg19", 224, 32, 512),
    "Xception": ("xception", 299, 71, 2048),
}


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What tlkeras knows about one `keras.applications` architecture."""

    name: str
    family: str
    default_size: int
    min_size: int
    feature_dim: int
    preprocessing: str  # an `ImagePreprocessing` mode

    @property
    def module(self):
        """The `keras.applications.<family>` module (holds `preprocess_input`)."""
        return getattr(keras.applications, _FAMILIES[self.family][0])

    @property
    def constructor(self):
        return getattr(keras.applications, self.name)

    def build(self, input_shape=None, weights=None):
        """Builds the headless base (`include_top=False`, no pooling)."""
        input_shape = tuple(input_shape or (self.default_size, self.default_size, 3))
        check_input_shape(self, input_shape)
        kwargs = {}
        if self.family in ("convnext", "efficientnet_v2", "mobilenet_v3"):
            kwargs["include_preprocessing"] = True
        return self.constructor(
            include_top=False, weights=weights, input_shape=input_shape, pooling=None, **kwargs
        )

    def block_of(self, layer_names):
        """Maps layer names (in model order) to block names; see the module docs."""
        return _assign_blocks(layer_names, *_FAMILIES[self.family][2:])


_REGISTRY = {
    name.lower(): BackboneSpec(name, fam, size, min_size, dim, _FAMILIES[fam][1])
    for name, (fam, size, min_size, dim) in _ARCHITECTURES.items()
}


def list_backbones():
    """Names of all registered backbones, in Keras' spelling, sorted."""
    return sorted(spec.name for spec in _REGISTRY.values())


def get(name):
    """Returns the `BackboneSpec` for `name` (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"Backbone name must be a string, received {type(name).__name__}.")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _REGISTRY:
        raise ValueError(
            f"Unknown backbone {name!r}. Expected one of tlkeras.backbones.list_backbones(): "
            f"{', '.join(list_backbones())}."
        )
    return _REGISTRY[key]


def exists(name):
    return isinstance(name, str) and name.lower().replace("-", "").replace("_", "") in _REGISTRY


def find_spec_for_model(base):
    """The spec whose architecture built `base` (a keras.applications model), or None."""
    if not isinstance(base, keras.Model):
        return None
    key = base.name.lower().replace("-", "").replace("_", "")
    for spec_key, spec in _REGISTRY.items():
        if key == spec_key:
            return spec
    # Keras names some models with their size, e.g. "mobilenetv2_1.00_224", "NASNet".
    aliases = {"nasnetmobile": "nasnet_mobile", "nasnetlarge": "nasnet_large"}
    for spec_key, spec in _REGISTRY.items():
        alias = aliases.get(spec_key, spec_key)
        if key.startswith(spec_key + "1.") or key == alias.replace("_", ""):
            return spec
    return None


def check_input_shape(spec, input_shape):
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(
            f"{spec.name}: expected input_shape (height, width, 3) of RGB images, "
            f"received input_shape={tuple(input_shape)}."
        )
    h, w = input_shape[:2]
    if h is not None and w is not None and min(h, w) < spec.min_size:
        raise ValueError(
            f"{spec.name}: input height and width must be at least {spec.min_size}, "
            f"received input_shape={tuple(input_shape)}."
        )


def _assign_blocks(layer_names, pattern, marks_end):
    regex = re.compile(pattern)
    keys = []
    for name in layer_names:
        match = regex.search(name)
        keys.append(next(g for g in match.groups() if g) if match else None)
    if marks_end:
        # A block is everything up to and including its end marker.
        result, pending = [None] * len(keys), []
        for i, key in enumerate(keys):
            pending.append(i)
            if key is not None:
                for j in pending:
                    result[j] = key
                pending = []
        for j in pending:
            result[j] = "top"
        # The stem is whatever precedes the first module's branches; keep it
        # separate only where it is explicit: the first marker swallows it.
        return result
    result, current = [], "stem"
    for key in keys:
        current = key if key is not None else current
        result.append(current)
    return result
