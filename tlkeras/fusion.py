"""Model fusion and compression: ensembles, weight soups and knowledge distillation.

`ensemble` turns several trained models into one `keras.Model` (one raw-pixel
input; each member keeps its own preprocessing and resizes inside), by
averaging their outputs, by a weighted average fitted on validation data, by
a meta-classifier stacked on their validation outputs, or by averaging the
weights of members fine-tuned from one base (a model soup). `distill` trains a
small student to match a teacher (any model, an ensemble included) with
`keras.distillation.Distiller`, on labeled and/or unlabeled images.

Example:

>>> import numpy as np, tlkeras
>>> from tlkeras.demo import small_cnn
>>> a = tlkeras.build_transfer_model("MobileNetV3Small", 3, input_shape=(32, 32, 3), weights=None)
>>> b = tlkeras.build_transfer_model(small_cnn(48, name="cnn48"), 3)  # a base of your own
>>> model = tlkeras.ensemble([a, b])
>>> model.input_shape, model.output_shape
((None, 48, 48, 3), (None, 3))
"""

import dataclasses
import logging

import keras
import numpy as np
import tensorflow as tf

from tlkeras import evaluation, models, training
from tlkeras.layers import InferenceMode

__all__ = ["METHODS", "DistillResult", "LogProbabilities", "MemberAverage", "calibration_error",
           "distill", "ensemble", "kl_divergence"]

logger = logging.getLogger("tlkeras")

METHODS = ("average", "weighted", "soup", "stacking")
_EPSILON = 1e-7


# ------------------------------------------------------------------ layers


@keras.saving.register_keras_serializable(package="tlkeras")
class MemberAverage(keras.layers.Layer):
    """The weighted mean of a list of member outputs: `sum_i member_weights[i] * inputs[i]`.

    It exposes `units` and `activation` (those of the members' output layer) so
    that tools reading a tlkeras model's "predictions" layer (e.g.
    `tlkeras.evaluate`) read the ensemble's task from it.

    Example:

    >>> import numpy as np
    >>> layer = MemberAverage([0.25, 0.75])
    >>> layer([np.ones((1, 2)), np.zeros((1, 2))]).numpy().tolist()
    [[0.25, 0.25]]
    """

    def __init__(self, member_weights, activation="softmax", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.member_weights = [float(w) for w in member_weights]
        self.activation = keras.activations.get(activation)
        self.units = None

    def build(self, input_shape):
        if len(input_shape) != len(self.member_weights):
            raise ValueError(
                f"MemberAverage: expected {len(self.member_weights)} member outputs (one per "
                f"weight), received {len(input_shape)}.")
        self.units = input_shape[0][-1]

    def call(self, inputs):
        total = 0.0
        for weight, x in zip(self.member_weights, inputs):
            total = total + weight * keras.ops.cast(x, "float32")
        return total

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "member_weights": self.member_weights,
                "activation": keras.activations.serialize(self.activation)}


@keras.saving.register_keras_serializable(package="tlkeras")
class LogProbabilities(keras.layers.Layer):
    """`log(clip(p, 1e-7, 1))`: probabilities to logits (softmax of them gives `p` back)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        return keras.ops.log(keras.ops.clip(keras.ops.cast(inputs, "float32"), _EPSILON, 1.0))

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="tlkeras")
class _MaskedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on logits for labels >= 0; a label of -1 (an unlabeled image) adds 0."""

    def __init__(self, name="masked_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        labeled = y_true >= 0
        loss = keras.losses.sparse_categorical_crossentropy(
            keras.ops.maximum(y_true, 0), y_pred, from_logits=True)
        return keras.ops.where(labeled, loss, keras.ops.zeros_like(loss))


# ------------------------------------------------------------------ ensemble


def ensemble(models_, *, method="average", validation_data=None, name=None):
    """Fuses trained models into one `keras.Model` taking raw RGB pixels in [0, 255].

    Members may differ in architecture and input size: the ensemble takes
    images at the largest member's size and resizes them (bilinear) to each
    member's own size inside, so every member keeps its own preprocessing.

    Args:
        models_: two or more trained `keras.Model`s taking images `(B, H, W, 3)`
            and predicting the same outputs (e.g. loaded with
            `keras.saving.load_model(run_dir + "/model.keras")`).
        method:
            - `"average"`: the mean of the members' outputs;
            - `"weighted"`: a weighted mean, the weights (>= 0, summing to 1)
              minimizing the negative log-likelihood on `validation_data`;
            - `"stacking"`: a multinomial logistic regression (scikit-learn)
              over the members' log-probabilities on `validation_data` only
              (never on training outputs, which overfit members make look too
              good), as a Dense softmax layer;
            - `"soup"`: one model whose weights are the members' average
              (model soups, Wortsman et al. 2022). Members must share one
              architecture (fine-tuned from the same base), else ValueError
              with the first difference. With `validation_data` the greedy
              soup: members sorted by validation accuracy, each added only if
              the soup's validation accuracy does not fall (and its NLL falls
              when accuracy ties); without, the uniform soup.
        validation_data: `(images, labels)` batches (a `tf.data.Dataset` or a
            tuple of arrays) at any size (resized to the ensemble's input);
            needed by "weighted" and "stacking". Labels are class ids.
        name: the model's name.

    Returns:
        An uncompiled `keras.Model`; its last layer is named "predictions", so
        `tlkeras.evaluate` and `tlkeras.export_model` take it like any
        tlkeras model. The soup's `soup_members` lists the indices souped.

    Example:

    >>> import numpy as np, tlkeras
    >>> from tlkeras.demo import small_cnn
    >>> a = tlkeras.build_transfer_model(small_cnn(32, name="cnn32"), 3)
    >>> b = tlkeras.build_transfer_model(small_cnn(40, name="cnn40"), 3)
    >>> x, y = np.random.uniform(0, 255, (12, 40, 40, 3)), np.arange(12) % 3
    >>> fused = tlkeras.ensemble([a, b], method="weighted", validation_data=(x, y))
    >>> fused.predict(x, verbose=0).shape
    (12, 3)
    """
    members = _check_members(models_)
    if method not in METHODS:
        raise ValueError(f"ensemble: expected method in {METHODS}, received method={method!r}.")
    if method in ("weighted", "stacking") and validation_data is None:
        raise ValueError(f"ensemble: method={method!r} fits on held-out data; pass "
                         "validation_data=(images, labels) not used to train the members.")
    if method == "soup":
        return _soup(members, validation_data, name)
    size = max((_image_size(m) for m in members), key=lambda s: s[0] * s[1])
    inputs = keras.Input(shape=(*size, 3), name="image")
    branches = [_branch(m, size, i) for i, m in enumerate(members)]
    outputs = [branch(inputs) for branch in branches]
    activation = _activation(members[0])
    if method == "average":
        weights = [1.0 / len(members)] * len(members)
        predictions = MemberAverage(weights, activation, name="predictions")(outputs)
    elif method == "weighted":
        labels, probabilities = _member_outputs(branches, validation_data, size)
        weights = _fit_member_weights(probabilities, labels, activation)
        logger.info("ensemble: member weights %s", [round(w, 4) for w in weights])
        predictions = MemberAverage(weights, activation, name="predictions")(outputs)
    else:
        if activation != "softmax":
            raise ValueError(f"ensemble: method='stacking' needs softmax (multiclass) members; "
                             f"member 0 ends in {activation!r}.")
        labels, probabilities = _member_outputs(branches, validation_data, size)
        dense = keras.layers.Dense(probabilities.shape[-1], activation="softmax",
                                   dtype="float32", name="predictions")
        logs = [LogProbabilities(name=f"log_probabilities_{i}")(o) for i, o in enumerate(outputs)]
        predictions = dense(keras.layers.Concatenate(name="member_log_probabilities")(logs))
        dense.set_weights(_fit_stacker(probabilities, labels))
    return keras.Model(inputs, predictions, name=name or f"{method}_ensemble_of_{len(members)}")


def _check_members(members):
    if isinstance(members, keras.Model) or not isinstance(members, (list, tuple)):
        raise TypeError(f"ensemble: expected a list of keras.Model, received "
                        f"{type(members).__name__}.")
    if len(members) < 2:
        raise ValueError(f"ensemble: expected at least 2 models, received {len(members)}.")
    for i, member in enumerate(members):
        if not isinstance(member, keras.Model):
            raise TypeError(f"ensemble: models[{i}] is a {type(member).__name__}, expected a "
                            "keras.Model.")
        _image_size(member, i)
    first = members[0].output_shape
    for i, member in enumerate(members[1:], 1):
        if member.output_shape[-1] != first[-1]:
            raise ValueError(
                f"ensemble: models[{i}] ({member.name!r}) has {member.output_shape[-1]} outputs, "
                f"models[0] ({members[0].name!r}) has {first[-1]}: members must predict the same "
                "classes in the same order.")
    return list(members)


def _image_size(model, index=0):
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[-1] == 3
            and None not in shape[1:3]):
        raise ValueError(f"ensemble: models[{index}] ({model.name!r}) has input shape {shape}; "
                         "expected images (batch, height, width, 3) of a fixed size.")
    return tuple(shape[1:3])


def _activation(model):
    try:
        layer = model.get_layer("predictions")
    except ValueError:
        return "softmax"  # a model not built by tlkeras: assume probabilities of classes
    activation = keras.activations.serialize(layer.activation)
    return activation if isinstance(activation, str) else activation.get("config", "softmax")


def _branch(member, size, index):
    """`member` behind a resize from the ensemble's size to its own, as a model named member_<i>."""
    inputs = keras.Input(shape=(*size, 3), name="image")
    own = _image_size(member, index)
    x = inputs if own == size else keras.layers.Resizing(*own, name="resize")(inputs)
    # Always in inference mode: no dropout ops in exported graphs (TFLite), whatever `training`.
    return keras.Model(inputs, InferenceMode(member)(x), name=f"member_{index}")


def _member_outputs(branches, data, size):
    """`(labels, probabilities (members, N, K))` of each member on `data`."""
    labels, outputs = [], [[] for _ in branches]
    for x, y in evaluation.iterate_batches(data):
        x = np.asarray(x, "float32")
        if x.shape[1:3] != size:
            x = tf.image.resize(x, size).numpy()
        for out, branch in zip(outputs, branches):
            out.append(np.asarray(branch.predict_on_batch(x), "float32"))
        labels.append(np.asarray(y))
    if not labels:
        raise ValueError("ensemble: validation_data yielded no samples.")
    labels = np.concatenate(labels)
    if labels.ndim == 2 and labels.shape[-1] > 1:  # one-hot
        labels = labels.argmax(-1)
    return labels.reshape(-1).astype("int64"), np.stack([np.concatenate(o) for o in outputs])


def _true_probability(probabilities, labels):
    """p(true label) of each member and sample, `(members, N)`."""
    if probabilities.shape[-1] == 1:  # one sigmoid unit
        p = probabilities[..., 0]
        return np.where(labels[None] == 1, p, 1.0 - p)
    return np.take_along_axis(probabilities, labels[None, :, None], axis=-1)[..., 0]


def _fit_member_weights(probabilities, labels, activation):
    """Simplex weights minimizing the NLL of the mixture (convex; L-BFGS on softmax logits)."""
    from scipy.optimize import minimize

    if activation not in ("softmax", "sigmoid") or (
            activation == "sigmoid" and probabilities.shape[-1] != 1):
        raise ValueError("ensemble: method='weighted' needs multiclass (softmax) or binary (one "
                         f"sigmoid) members; they end in {activation!r} with "
                         f"{probabilities.shape[-1]} outputs.")
    q = np.clip(_true_probability(probabilities, labels).astype("float64"), _EPSILON, 1.0)

    def objective(logits):
        w = np.exp(logits - logits.max())
        w /= w.sum()
        mix = w @ q
        g = -(q / mix).mean(axis=1)  # d NLL / d w
        return -np.log(mix).mean(), w * (g - w @ g)

    found = minimize(objective, np.zeros(len(q)), jac=True, method="L-BFGS-B")
    w = np.exp(found.x - found.x.max())
    return (w / w.sum()).tolist()


def _fit_stacker(probabilities, labels):
    """`[kernel, bias]` of a multinomial logistic regression on the members' log-probabilities."""
    from sklearn.linear_model import LogisticRegression

    members, n, k = probabilities.shape
    features = np.log(np.clip(probabilities, _EPSILON, 1.0)).transpose(1, 0, 2).reshape(n, -1)
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"ensemble: validation labels must be class ids in [0, {k}); received "
                         f"values from {labels.min()} to {labels.max()}.")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("ensemble: method='stacking' needs validation_data with at least 2 "
                         f"classes; it holds only class {classes[0]}.")
    regression = LogisticRegression(max_iter=2000).fit(features, labels)
    kernel = np.zeros((members * k, k), "float32")
    bias = np.full((k,), -30.0, "float32")  # a class absent from validation_data: never chosen
    coef = regression.coef_ if len(classes) > 2 else np.stack([-regression.coef_[0] / 2,
                                                               regression.coef_[0] / 2])
    intercept = regression.intercept_ if len(classes) > 2 else np.array(
        [-regression.intercept_[0] / 2, regression.intercept_[0] / 2])
    kernel[:, classes] = coef.T
    bias[classes] = intercept
    return [kernel, bias]


# ------------------------------------------------------------------ soups


def _soup(members, validation_data, name):
    _check_same_architecture(members)
    if validation_data is None:
        chosen = list(range(len(members)))
    else:
        chosen = _greedy_soup(members, validation_data)
    soup = _clone(members[0], name or f"soup_of_{len(chosen)}")
    soup.set_weights(_average_weights([members[i] for i in chosen]))
    soup.soup_members = chosen
    logger.info("ensemble: soup of members %s", chosen)
    return soup


def _check_same_architecture(members):
    def signature(model):
        return [(type(layer).__name__, [tuple(w.shape) for w in layer.weights])
                for layer in model._flatten_layers(include_self=False) if layer.weights]

    reference = signature(members[0])
    for i, member in enumerate(members[1:], 1):
        other = signature(member)
        reason = None
        if len(other) != len(reference):
            reason = (f"it has {len(other)} layers with weights, models[0] has {len(reference)} "
                      f"({sum(len(s) for _, s in other)} vs {sum(len(s) for _, s in reference)} "
                      "weight tensors)")
        else:
            for j, (a, b) in enumerate(zip(reference, other)):
                if a != b:
                    reason = (f"layer {j} with weights is {b[0]} {b[1]} there but {a[0]} {a[1]} in "
                              "models[0]")
                    break
        if reason:
            raise ValueError(
                f"ensemble: method='soup' averages weights of models fine-tuned from one base, "
                f"but models[{i}] ({member.name!r}) has another architecture than models[0] "
                f"({members[0].name!r}): {reason}. Use method='average', 'weighted' or "
                "'stacking' for different architectures.")


def _average_weights(members):
    arrays = [m.get_weights() for m in members]
    average = []
    for values in zip(*arrays):
        if np.issubdtype(values[0].dtype, np.floating):
            average.append(np.mean(np.stack(values), axis=0).astype(values[0].dtype))
        else:  # counters and seeds: the first member's
            average.append(values[0])
    return average


def _clone(model, name):
    config = model.get_config()
    config["name"] = name
    return model.__class__.from_config(config)


def _soup_scores(model, data):
    labels, probabilities = evaluation.collect_predictions(model, data)
    if labels.ndim == 2 and labels.shape[-1] > 1:
        labels = labels.argmax(-1)
    labels = labels.reshape(-1).astype("int64")
    p = _true_probability(probabilities[None], labels)[0]
    if probabilities.shape[-1] == 1:
        accuracy = float(np.mean((probabilities[:, 0] >= 0.5) == (labels == 1)))
    else:
        accuracy = float(np.mean(probabilities.argmax(-1) == labels))
    return accuracy, float(-np.mean(np.log(np.clip(p, _EPSILON, 1.0))))


def _greedy_soup(members, data):
    scores = [_soup_scores(m, data) for m in members]
    order = sorted(range(len(members)), key=lambda i: (-scores[i][0], scores[i][1]))
    chosen, best = [order[0]], scores[order[0]]
    candidate = _clone(members[0], "greedy_soup_candidate")
    for i in order[1:]:
        candidate.set_weights(_average_weights([members[j] for j in chosen + [i]]))
        score = _soup_scores(candidate, data)
        if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
            chosen, best = chosen + [i], score
    logger.info("ensemble: greedy soup validation accuracy %.4f, NLL %.4f", *best)
    return sorted(chosen)


# ------------------------------------------------------------------ distillation


@dataclasses.dataclass
class DistillResult:
    """What `distill` did: the trained student, its history and the files written."""

    model: keras.Model
    history: dict  # metric name -> one value per epoch
    epochs: int
    run_dir: str | None = None
    paths: dict = dataclasses.field(default_factory=dict)


def distill(
    teacher,
    student,
    train_data,
    validation_data=None,
    *,
    temperature=3.0,
    alpha=0.1,
    epochs=5,
    unlabeled_data=None,
    learning_rate=1e-3,
    weights="imagenet",
    cache_teacher="auto",
    run_dir=None,
    callbacks=(),
    class_names=None,
    seed=None,
    verbose=1,
):
    """Trains a student to reproduce a teacher (knowledge distillation); returns a `DistillResult`.

    Built on `keras.distillation.Distiller` with `LogitsDistillation`: the loss
    is `alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)`,
    where `_T` are both models' probabilities softened at `temperature`
    (computed from their log-probabilities, since tlkeras models output
    probabilities). Teacher and student may take different input sizes: each
    gets the images resized (bilinear) to its own size. The teacher is frozen.

    Args:
        teacher: a trained `keras.Model` with softmax outputs, e.g. a
            `tlkeras.ensemble`.
        student: a backbone name (built with `tlkeras.build_transfer_model` at
            its own default input size and `weights`, the whole base trainable)
            or a `keras.Model` (trained in place, as its trainable flags say).
        train_data: `(images, labels)` batches (a `tf.data.Dataset`), or a
            dataset of images alone (teacher targets only), or None when
            `unlabeled_data` is given.
        validation_data: `(images, labels)` batches; monitored by checkpoints.
        temperature: softens both distributions; 1 compares them as they are.
        alpha: weight of the labels' cross-entropy; `1 - alpha` is the
            teacher's. `alpha=0` learns from the teacher alone.
        epochs: passes over the training (and unlabeled) data.
        unlabeled_data: a dataset of image batches (or of `(images, labels)`,
            labels ignored): they add teacher targets only, mixed with
            `train_data`'s batches at random.
        learning_rate: Adam's.
        weights: ImageNet (`"imagenet"`), None or a path, for a student given
            by name.
        cache_teacher: run the teacher once over the data and keep its outputs
            (and the images, at the student's size) in memory, so each epoch
            costs the student alone. `"auto"`: on unless `train_data` or
            `unlabeled_data` records an augmentation (`tlkeras.data`
            pipelines do); pass False for a pipeline that changes its images
            every epoch or does not fit in memory.
        run_dir: the run folder: `config.json`, `history.csv`,
            `checkpoints/best.weights.h5`, `model.keras` (the student) and
            TensorBoard logs under `logs/`; a killed run started again with the
            same `run_dir` resumes at its last epoch. None writes nothing.
        callbacks: more Keras callbacks (they see the `Distiller`).
        class_names: for TensorBoard images and `config.json`.
        seed: makes weight init and the mixing of batches repeatable.
        verbose: Keras `fit` verbosity.

    Example:

    >>> import numpy as np, tensorflow as tf, tlkeras
    >>> from tlkeras.demo import small_cnn
    >>> teacher = tlkeras.build_transfer_model("MobileNetV3Small", 3, input_shape=(48, 48, 3),
    ...                                        weights=None)
    >>> student = tlkeras.build_transfer_model(small_cnn(32), 3)
    >>> x, y = np.random.uniform(0, 255, (8, 32, 32, 3)), np.arange(8) % 3
    >>> result = tlkeras.distill(teacher, student, tf.data.Dataset.from_tensor_slices(
    ...     (x, y)).batch(4), epochs=1, verbose=0)
    >>> result.model is student, result.model.input_shape
    (True, (None, 32, 32, 3))
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill: expected 0 <= alpha <= 1, received alpha={alpha!r}.")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"distill: expected epochs to be an int >= 1, received epochs={epochs!r}.")
    if not isinstance(teacher, keras.Model):
        raise TypeError(f"distill: expected teacher to be a keras.Model, received "
                        f"{type(teacher).__name__}.")
    if train_data is None and unlabeled_data is None:
        raise ValueError("distill: pass train_data, unlabeled_data or both.")
    num_classes = teacher.output_shape[-1]
    if _activation(teacher) != "softmax" or num_classes < 2:
        raise ValueError(f"distill: the teacher {teacher.name!r} must output class probabilities "
                         f"(softmax over >= 2 classes); it has {num_classes} output(s) ending in "
                         f"{_activation(teacher)!r}.")
    class_names = class_names or getattr(train_data, "class_names", None)
    student_name = student if isinstance(student, str) else getattr(student, "name", "?")
    if isinstance(student, str):
        student = models.build_transfer_model(student, num_classes, weights=weights)
        models.unfreeze(student, "all")
    if not isinstance(student, keras.Model):
        raise TypeError(f"distill: expected student to be a backbone name or a keras.Model, "
                        f"received {type(student).__name__}.")
    if student.output_shape[-1] != num_classes:
        raise ValueError(f"distill: the student {student.name!r} has {student.output_shape[-1]} "
                         f"outputs, the teacher {num_classes}: build it with num_classes="
                         f"{num_classes}.")
    train = _training_stream(train_data, unlabeled_data, seed)
    val = None if validation_data is None else _labeled(validation_data, "validation_data")
    teacher_logits, student_logits = _logits_model(teacher, "teacher"), _logits_model(
        student, "student")
    augmented = any(getattr(d, "augmentation", None) is not None
                    for d in (train_data, unlabeled_data))
    if cache_teacher is True or (cache_teacher == "auto" and not augmented):
        train = _with_teacher_outputs(train, teacher_logits, student, shuffle=True, seed=seed)
        if val is not None:
            val = _with_teacher_outputs(val, teacher_logits, student, shuffle=False)
        teacher_logits, student_logits = _cached_pair(student, num_classes)
    distiller = keras.distillation.Distiller(
        teacher=teacher_logits, student=student_logits,
        # A KLDivergence instance: LogitsDistillation softmaxes the tempered logits only for
        # one (the "kl_divergence" string would compare the logits themselves).
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=temperature, loss=keras.losses.KLDivergence()),
        student_loss_weight=float(alpha))
    distiller.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss=_MaskedSparseCrossentropy(), metrics=["accuracy"])
    for x, *_ in train.take(1):  # built before fit, so that a backup can be restored into it
        distiller(keras.tree.map_structure(lambda t: t[:1], x))
    config = {"teacher": teacher.name, "student": student_name, "temperature": temperature,
              "alpha": alpha, "epochs": epochs, "learning_rate": learning_rate,
              "unlabeled_data": unlabeled_data is not None, "seed": seed,
              "cache_teacher": cache_teacher,
              "class_names": class_names}
    run = training._RunFolder(run_dir, config)
    shown = None  # validation images for TensorBoard's confusion matrix, at the student's size
    if validation_data is not None:
        size = student.input_shape[1:3]
        shown = _labeled(validation_data, "validation_data").map(
            lambda x, y, w: (x if None in size else tf.image.resize(x, size), y))
    cbs = run.callbacks(student, distiller, "distill", shown, class_names, None, callbacks,
                        steps=None)
    distiller.fit(train, validation_data=val, epochs=epochs, callbacks=cbs, verbose=verbose)
    paths = run.finish(student)
    return DistillResult(student, run.history_lists(), epochs, run.path, paths)


def _logits_model(model, role):
    """`model` behind a resize from any image size, returning log-probabilities."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    size = _image_size(model) if None not in model.input_shape[1:3] else None
    x = inputs if size is None else keras.layers.Resizing(*size, name="resize")(inputs)
    outputs = LogProbabilities(name="log_probabilities")(model(x))
    return keras.Model(inputs, outputs, name=f"{role}_logits")


def _with_teacher_outputs(stream, teacher_logits, student, shuffle, seed=None):
    """`({"image", "teacher"}, labels, weights)` batches: `stream` with the teacher run once."""
    size = _image_size(student) if None not in student.input_shape[1:3] else None
    images, teacher, labels, weights, batch = [], [], [], [], None
    for x, y, w in stream:
        batch = batch or int(x.shape[0])
        teacher.append(np.asarray(teacher_logits.predict_on_batch(x), "float32"))
        images.append((x if size is None else tf.image.resize(x, size)).numpy())
        labels.append(y.numpy())
        weights.append(w.numpy())
    if not images:
        raise ValueError("distill: the training data yielded no images.")
    arrays = ({"image": np.concatenate(images), "teacher": np.concatenate(teacher)},
              np.concatenate(labels), np.concatenate(weights))
    data = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        data = data.shuffle(len(arrays[1]), seed=seed, reshuffle_each_iteration=True)
    return data.batch(batch).prefetch(tf.data.AUTOTUNE)


def _cached_pair(student, num_classes):
    """Teacher and student of the Distiller on `{"image", "teacher"}` inputs: the teacher
    returns its cached log-probabilities, the student runs on the image."""
    size = student.input_shape[1:3]

    def inputs():
        return {"image": keras.Input(shape=(*size, 3), name="image"),
                "teacher": keras.Input(shape=(num_classes,), name="teacher")}

    teacher_in, student_in = inputs(), inputs()
    teacher = keras.Model(teacher_in, keras.layers.Identity(name="cached")(teacher_in["teacher"]),
                          name="cached_teacher_logits")
    outputs = LogProbabilities(name="log_probabilities")(student(student_in["image"]))
    return teacher, keras.Model(student_in, outputs, name="student_logits")


def _labeled(data, argument):
    """`(images float32, labels int32, weight 1)` batches; an image-only dataset is refused."""
    if isinstance(data, (tuple, list)):
        data = tf.data.Dataset.from_tensor_slices(tuple(data)).batch(32)
    if not isinstance(data.element_spec, tuple):
        raise ValueError(f"distill: {argument} must yield (images, labels) batches; it yields "
                         "images alone (pass them as unlabeled_data).")
    return data.map(lambda x, y, *_: (tf.cast(x, tf.float32), _class_ids(y),
                                      tf.ones(tf.shape(x)[:1])))


def _unlabeled(data):
    """`(images float32, label -1, weight 0)` batches from images or `(images, labels)` batches."""
    if isinstance(data, np.ndarray):
        data = tf.data.Dataset.from_tensor_slices(data).batch(32)
    return data.map(_mark_unlabeled)


def _mark_unlabeled(x, *_):
    n = tf.shape(x)[:1]
    return tf.cast(x, tf.float32), tf.fill(n, tf.constant(-1, tf.int32)), tf.zeros(n)


def _class_ids(y):
    if y.shape.rank == 2 and y.shape[-1] not in (None, 1):  # one-hot
        return tf.argmax(y, axis=-1, output_type=tf.int32)
    return tf.reshape(tf.cast(y, tf.int32), [-1])


def _training_stream(train_data, unlabeled_data, seed):
    streams = []
    if train_data is not None:
        is_images = isinstance(train_data, np.ndarray) or (
            isinstance(train_data, tf.data.Dataset) and not isinstance(train_data.element_spec,
                                                                       tuple))
        streams.append(_unlabeled(train_data) if is_images else _labeled(train_data,
                                                                         "train_data"))
    if unlabeled_data is not None:
        streams.append(_unlabeled(unlabeled_data))
    if len(streams) == 1:
        return streams[0]
    sizes = [int(s.cardinality()) for s in streams]
    known = min(sizes) > 0  # else unknown or infinite: mix half and half
    mixed = tf.data.Dataset.sample_from_datasets(
        streams, weights=[n / sum(sizes) for n in sizes] if known else [0.5, 0.5], seed=seed,
        stop_on_empty_dataset=False)
    return mixed.apply(tf.data.experimental.assert_cardinality(sum(sizes))) if known else mixed


def kl_divergence(teacher_probabilities, student_probabilities):
    """Mean KL(teacher || student) of two arrays of class probabilities `(N, K)`, in nats.

    >>> round(kl_divergence([[0.5, 0.5]], [[0.9, 0.1]]), 4)
    0.5108
    """
    p = np.clip(np.asarray(teacher_probabilities, "float64"), _EPSILON, 1.0)
    q = np.clip(np.asarray(student_probabilities, "float64"), _EPSILON, 1.0)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))


def calibration_error(probabilities, labels, bins=15):
    """Expected calibration error (top-1 confidence vs accuracy over `bins` equal-width bins).

    >>> round(calibration_error([[0.9, 0.1], [0.8, 0.2]], [0, 1], bins=10), 4)
    0.45
    """
    probabilities = np.asarray(probabilities)
    confidence = probabilities.max(-1)
    correct = probabilities.argmax(-1) == np.asarray(labels).reshape(-1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)

