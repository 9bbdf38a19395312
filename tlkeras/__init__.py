"""tlkeras: transfer learning for Keras 3 on TensorFlow.

Every model tlkeras builds takes raw RGB pixels in [0, 255] (uint8 or float);
the architecture's own preprocessing is part of the model.

Example:

>>> import tlkeras
>>> model = tlkeras.build_transfer_model("MobileNetV2", num_classes=5,
...                                      input_shape=(96, 96, 3), weights=None)
>>> model.output_shape
(None, 5)
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter

_backend = _os.environ.get("KERAS_BACKEND", "tensorflow")
if _backend != "tensorflow":
    raise ImportError(
        "tlkeras needs Keras 3 with the TensorFlow backend, but KERAS_BACKEND="
        f"{_backend!r}. Unset KERAS_BACKEND or set KERAS_BACKEND=tensorflow "
        "before importing keras or tlkeras."
    )

from tlkeras import quiet as _quiet  # noqa: E402

with _quiet.native_stderr_filter():  # TensorFlow's native start-up notices (not errors)
    import keras as _keras  # noqa: E402
_quiet.start_devices()  # the CUDA probe ("failed call to cuInit" on CPU machines), filtered now

if _keras.backend.backend() != "tensorflow":  # e.g. set in ~/.keras/keras.json
    raise ImportError(
        "tlkeras needs Keras 3 with the TensorFlow backend, but Keras is "
        f"configured with {_keras.backend.backend()!r} (see ~/.keras/keras.json "
        "or KERAS_BACKEND). Set KERAS_BACKEND=tensorflow."
    )

__version__ = "0.1.0"

from tlkeras import backbones  # noqa: E402,F401
from tlkeras.layers import ImagePreprocessing  # noqa: E402,F401
from tlkeras.models import (  # noqa: E402,F401
    build_transfer_model,
    freeze,
    get_base,
    split_model,
    trainable_summary,
    unfreeze,
)
from tlkeras import data  # noqa: E402,F401
from tlkeras.features import (  # noqa: E402,F401
    FeatureSet,
    extract_features,
    features_dataset,
    fit_sklearn,
)
from tlkeras import callbacks  # noqa: E402,F401
from tlkeras.evaluation import EvaluationReport, evaluate  # noqa: E402,F401
from tlkeras.explain import Explanation, explain, explain_check  # noqa: E402,F401
from tlkeras.export import ExportError, ExportResult, ExportVerificationError, export_model  # noqa: E402,F401
from tlkeras.training import FineTuneResult, fine_tune  # noqa: E402,F401
from tlkeras import optimizers  # noqa: E402,F401
from tlkeras import tta  # noqa: E402,F401
from tlkeras import cutpoint  # noqa: E402,F401
from tlkeras.lr_finder import LRFindResult, lr_find  # noqa: E402,F401
# tlkeras.text registers the layers that text models saved to .keras need.
from tlkeras import text  # noqa: E402,F401
from tlkeras.hub import HubLayer  # noqa: E402,F401
from tlkeras.tuning import TuneResult, tune  # noqa: E402,F401
from tlkeras import anatomy, augmentation, phases  # noqa: E402,F401
from tlkeras.continual import AddClassesResult, ExemplarMemory, add_classes  # noqa: E402,F401
from tlkeras.predict import load_run, predict  # noqa: E402,F401
from tlkeras.bases import ResolvedBase, resolve_base  # noqa: E402,F401
from tlkeras.unlabeled import (  # noqa: E402,F401
    GradientReversal,
    adapt,
    cluster,
    pretrain,
    similar,
)
from tlkeras import atomic, runs, validation  # noqa: E402,F401
from tlkeras.fusion import DistillResult, distill, ensemble  # noqa: E402,F401
