"""Class-incremental learning: add new classes to a trained classifier without forgetting old ones.

`add_classes` extends the "predictions" layer with units for the new classes (the old units,
their weights and their class names stay in place, so an exported old model's label indexes
stay valid) and trains the head on the frozen base's features, with:

- `"rehearsal"`: a small exemplar memory of the old classes is replayed (iCaRL, Rebuffi et al.
  2017): per class, the images whose base features' running mean comes closest to the class
  mean (`herding`), at most `memory_per_class` per class and `memory_size` in all;
- `"lwf"`: the old outputs are distilled from the old model on the training data (Learning
  without Forgetting, Li and Hoiem 2016);
- `"rehearsal+lwf"` (the default): both; `"naive"`: plain fine-tuning, for comparison.

The cross-entropy is class-balanced and, after training, the new units' weights are scaled to
the old units' mean norm (weight aligning, Zhao et al. 2020), so the many new images do not make
the new classes take over. The memory lives in the run folder (`memory/`), grows with each call
and is written atomically and verified on reading.

Example:

>>> import numpy as np, keras, tlkeras
>>> model = tlkeras.build_transfer_model("MobileNetV2", num_classes=2,
...                                      input_shape=(32, 32, 3), weights=None)
>>> rng = np.random.default_rng(0)
>>> old = (rng.uniform(0, 255, (8, 32, 32, 3)), np.array([0, 1] * 4))
>>> new = (rng.uniform(0, 255, (6, 32, 32, 3)), np.array([0, 1, 2] * 2))
>>> result = tlkeras.add_classes(model, new, new_class_names=["c", "d", "e"],
...                              class_names=["a", "b"], old_data=old, epochs=1, verbose=0)
>>> result.class_names, result.model.output_shape
(['a', 'b', 'c', 'd', 'e'], (None, 5))
>>> result.memory.counts()
{'a': 4, 'b': 4, 'c': 2, 'd': 2, 'e': 2}
"""

import dataclasses
import hashlib
import json
import logging
import os

import keras
import numpy as np
import tensorflow as tf

from tlkeras import models
from tlkeras.features import extract_features

logger = logging.getLogger("tlkeras")

__all__ = ["AddClassesResult", "ExemplarMemory", "IncrementalLoss", "METHODS", "add_classes",
           "herding", "load_class_steps", "step_accuracies"]

METHODS = ("rehearsal+lwf", "rehearsal", "lwf", "naive")
MEMORY_DIR = "memory"
STATE_FILE = "continual.json"  # the class steps and what each add_classes call did
_MANIFEST = "manifest.json"


# ------------------------------------------------------------------ model anatomy


def _output_layer(model):
    """The classification layer `add_classes` extends (tlkeras's layout: "predictions").

    The one place this module names a head layer; the base and features come from
    `tlkeras.models.get_base` / `split_model`.
    """
    try:
        return model.get_layer("predictions")
    except ValueError:
        raise ValueError(
            f"add_classes: model {model.name!r} has no layer named 'predictions'; expected a "
            "model built by tlkeras.build_transfer_model (or a run folder of tlkeras train)."
        ) from None


def _extend(model, num_new):
    """`model` (layers shared) with a wider output layer: old units first, unchanged."""
    old = _output_layer(model)
    config = old.get_config()
    config["units"] = old.units + num_new
    new = keras.layers.Dense.from_config(config)
    # The tensor feeding the old output layer (node 0: its call in the model's own graph).
    x = new(old._inbound_nodes[0].input_tensors[0])
    extended = keras.Model(model.inputs, x, name=model.name)
    kernel, bias = old.get_weights()
    new_kernel, new_bias = new.get_weights()
    new_kernel[:, : old.units] = kernel
    new_bias[: old.units] = bias
    new_bias[old.units:] = bias.mean()  # new units start level with the old ones
    new.set_weights([new_kernel, new_bias])
    return extended


def _clone(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _align_weights(model, num_old):
    """Weight aligning: scales the new units so their mean kernel norm equals the old units'."""
    layer = _output_layer(model)
    kernel, bias = layer.get_weights()
    norms = np.linalg.norm(kernel, axis=0)
    gamma = norms[:num_old].mean() / max(norms[num_old:].mean(), 1e-12)
    kernel[:, num_old:] *= gamma
    bias[num_old:] *= gamma
    layer.set_weights([kernel, bias])
    return float(gamma)


# ------------------------------------------------------------------ exemplar memory


def herding(features, m):
    """Indices of `m` rows of `features` chosen by herding (iCaRL), in the order chosen.

    Each pick is the row that brings the mean of the picks (of L2-normalised
    features) closest to the mean of all rows, so any prefix of the result is
    itself a good exemplar set (which is how the memory shrinks).

    >>> import numpy as np
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [1.0, 0.1]])
    >>> herding(x, 2).tolist()
    [2, 3]
    """
    x = np.asarray(features, dtype="float64")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mean = x.mean(axis=0)
    total = np.zeros_like(mean)
    available = np.ones(len(x), bool)
    chosen = []
    for k in range(1, min(m, len(x)) + 1):
        distance = np.linalg.norm(mean - (total + x) / k, axis=1)
        distance[~available] = np.inf
        i = int(np.argmin(distance))
        chosen.append(i)
        available[i] = False
        total += x[i]
    return np.asarray(chosen, dtype="int64")


@dataclasses.dataclass
class ExemplarMemory:
    """Exemplar images of each class, in herding order (best first).

    `labels` index `class_names`. `per_class` caps each class, `total` (or
    None) the whole memory: each class keeps `budget(len(class_names))`.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list
    per_class: int = 20
    total: int | None = None

    def budget(self, num_classes):
        """Exemplars kept per class when the memory holds `num_classes` classes."""
        m = self.per_class
        if self.total is not None:
            m = min(m, self.total // max(num_classes, 1))
        return m

    def counts(self):
        """`{class name: number of exemplars}`."""
        return {name: int(np.sum(self.labels == i)) for i, name in enumerate(self.class_names)}

    def __len__(self):
        return len(self.labels)

    def select(self, images, labels, features, names):
        """Adds (or replaces) the classes `names` with herding picks from `images`.

        `labels` index `names`; `features` are the base's features of `images`.
        """
        keep = ~np.isin(self.labels, [self.class_names.index(n) for n in names
                                      if n in self.class_names])
        images_out = [self.images[keep]] if len(self.labels) else []
        labels_out = [self.labels[keep]]
        class_names = list(self.class_names) + [n for n in names if n not in self.class_names]
        m = self.budget(len(class_names))
        for i, name in enumerate(names):
            rows = np.flatnonzero(labels == i)
            picks = rows[herding(features[rows], m)]
            images_out.append(_compact(images[picks]))
            labels_out.append(np.full(len(picks), class_names.index(name), "int32"))
        self.images = np.concatenate(images_out)
        self.labels = np.concatenate(labels_out).astype("int32")
        self.class_names = class_names
        self.reduce()

    def reduce(self):
        """Keeps the first `budget` exemplars of every class (iCaRL's ReduceExemplarSet)."""
        m = self.budget(len(self.class_names))
        keep = np.zeros(len(self.labels), bool)
        for i in range(len(self.class_names)):
            keep[np.flatnonzero(self.labels == i)[:m]] = True
        self.images, self.labels = self.images[keep], self.labels[keep]

    def save(self, folder):
        """Writes `exemplars-<hash>.npz` then `manifest.json` (the commit point), atomically."""
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".exemplars.{os.getpid()}.tmp.npz")
        np.savez(tmp, images=self.images, labels=self.labels)
        digest = _sha256(tmp)
        name = f"exemplars-{digest[:16]}.npz"
        os.replace(tmp, os.path.join(folder, name))
        manifest = {"file": name, "sha256": digest, "class_names": list(self.class_names),
                    "counts": self.counts(), "per_class": self.per_class, "total": self.total,
                    "image_shape": list(self.images.shape[1:]), "dtype": str(self.images.dtype)}
        _write_json(os.path.join(folder, _MANIFEST), manifest)
        for other in os.listdir(folder):  # earlier versions, now unreferenced
            if other.startswith("exemplars-") and other != name:
                os.remove(os.path.join(folder, other))

    @classmethod
    def load(cls, folder):
        """Reads a memory folder, checking the file's hash, labels and counts."""
        path = os.path.join(folder, _MANIFEST)
        try:
            with open(path) as f:
                manifest = json.load(f)
            data_path = os.path.join(folder, manifest["file"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"Exemplar memory {path}: cannot read its manifest ({error}).") \
                from None
        if not os.path.isfile(data_path) or _sha256(data_path) != manifest["sha256"]:
            raise ValueError(f"Exemplar memory {data_path}: missing or its SHA-256 differs from "
                             f"{path}; the memory is damaged. Pass old_data= to choose it again.")
        with np.load(data_path, allow_pickle=False) as f:
            memory = cls(f["images"], f["labels"].astype("int32"), list(manifest["class_names"]),
                         manifest["per_class"], manifest["total"])
        if memory.counts() != manifest["counts"]:
            raise ValueError(f"Exemplar memory {data_path}: per-class counts {memory.counts()} "
                             f"differ from the manifest's {manifest['counts']}.")
        return memory


def _compact(images):
    """uint8 when the pixels are whole numbers in [0, 255] (as decoded images are)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 and images.size and images.min() >= 0 and images.max() <= 255 \
            and np.array_equal(images, np.round(images)):
        return images.astype("uint8")
    return images


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path, value):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)


# ------------------------------------------------------------------ training


@keras.saving.register_keras_serializable(package="tlkeras")
class IncrementalLoss(keras.losses.Loss):
    """Cross-entropy on all classes plus, with `distillation > 0`, LwF's distillation.

    `y_true` packs `[label, teacher log-probabilities of the old classes...]`; the
    student's old-class log-probabilities (its softmax restricted to the old units)
    are pulled towards the teacher's at `temperature`.
    """

    def __init__(self, num_old, distillation=1.0, temperature=2.0, name="incremental_loss",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_old, self.distillation, self.temperature = num_old, distillation, temperature

    def call(self, y_true, y_pred):
        ops = keras.ops
        labels = ops.cast(y_true[:, 0], "int32")
        loss = keras.losses.sparse_categorical_crossentropy(labels, y_pred)
        if self.distillation:
            t = self.temperature
            teacher = ops.softmax(y_true[:, 1: 1 + self.num_old] / t, axis=-1)
            student = ops.log_softmax(ops.log(y_pred[:, : self.num_old] + 1e-7) / t, axis=-1)
            loss = loss + self.distillation * t * t * -ops.sum(teacher * student, axis=-1)
        return loss

    def get_config(self):
        return {**super().get_config(), "num_old": self.num_old,
                "distillation": self.distillation, "temperature": self.temperature}


@dataclasses.dataclass
class AddClassesResult:
    """What `add_classes` did.

    `model` is the extended model (the input model is not changed), `class_names`
    all its classes in output order, `class_steps` the class names added at each
    step (the first: the original classes), `memory` the exemplar memory after
    this step, `metrics` old/new/all-class accuracy on `validation_data`.
    """

    model: keras.Model
    class_names: list
    class_steps: list
    memory: ExemplarMemory | None
    history: dict
    metrics: dict = dataclasses.field(default_factory=dict)
    run_dir: str | None = None


def add_classes(model, new_data, *, new_class_names, method="rehearsal+lwf", old_data=None,
                memory=None, class_names=None, epochs=30, learning_rate=1e-3, batch_size=64,
                memory_per_class=20, memory_size=None, distillation=1.0, temperature=2.0,
                validation_data=None, run_dir=None, seed=None, verbose=1):
    """Adds classes to a trained multiclass model; returns an `AddClassesResult`.

    The base stays frozen: its features are computed once per image and the
    head (the layers after "features") is trained on them.

    Args:
        model: a `tlkeras.build_transfer_model` classifier, or a run folder
            (of `fine_tune`, `tlkeras train` or an earlier `add_classes`)
            holding `model.keras`; its class names, class steps and memory
            are then read from it, and `run_dir` defaults to it.
        new_data: `(images, labels)` arrays or a `tf.data.Dataset` of such
            batches; labels index `new_class_names` (0 to len - 1).
        new_class_names: names of the new classes (none of the old ones).
        method: one of `METHODS`: `"rehearsal+lwf"`, `"rehearsal"`, `"lwf"`,
            `"naive"` (plain fine-tuning, which forgets; for comparison).
        old_data: data of the old classes (labels index the old classes) to
            choose their exemplars from; needed for rehearsal unless the
            memory (`memory=` or the run folder's) already holds them.
        memory: an `ExemplarMemory` or a memory folder (default: `<run folder>/memory`).
        class_names: the model's current classes (default: the run folder's,
            else "0", "1", ...).
        epochs, learning_rate, batch_size: head training (Adam).
        memory_per_class, memory_size: exemplars kept per class, and in all
            (None: no total cap). Ignored when an existing memory is used (it
            keeps its own budget).
        distillation, temperature: LwF's loss weight and softmax temperature.
        validation_data: data of all classes, labels in the output order
            (`result.class_names`), for old/new/all-class accuracy.
        run_dir: where to write `model.keras`, `labels.txt`, `config.json`,
            `continual.json` and `memory/` (None: nothing is written).
        seed: makes the new units' initialisation and shuffling repeatable.
        verbose: Keras `fit` verbosity.
    """
    if method not in METHODS:
        raise ValueError(f"add_classes: expected method in {METHODS}, received method={method!r}.")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    source = None
    if isinstance(model, (str, os.PathLike)):
        source = _run_folder_of(model)
        model = keras.saving.load_model(os.path.join(source, "model.keras"), compile=False)
        run_dir = source if run_dir is None else run_dir
    state = _read_state(source) or _read_state(run_dir)
    old_names = _old_class_names(model, class_names, source or run_dir, state)
    new_class_names = [str(n) for n in new_class_names]
    clash = sorted(set(new_class_names) & set(old_names))
    if clash or len(set(new_class_names)) != len(new_class_names) or not new_class_names:
        raise ValueError(
            "add_classes: new_class_names must be distinct names not already in the model; "
            f"received {new_class_names} (already in the model: {clash}).")
    num_old, num_new = len(old_names), len(new_class_names)
    class_steps = state["class_steps"] if state else [old_names]

    x_new, y_new = _collect(new_data, num_new, "new_data", "new_class_names")
    work = _clone(model)
    models.get_base(work)  # a clear error for models without a tlkeras base
    feats_new = _features(work, x_new)

    memory = _resolve_memory(memory, source or run_dir, memory_per_class, memory_size)
    if old_data is not None:
        x_old, y_old = _collect(old_data, num_old, "old_data", "the model's classes")
        memory.select(x_old, y_old, _features(work, x_old), old_names)
    rehearse = method.startswith("rehearsal")
    if rehearse:
        missing = [n for n in old_names if memory.counts().get(n, 0) == 0]
        if missing:
            raise ValueError(
                f"add_classes: method={method!r} replays exemplars of the old classes, but the "
                f"memory holds none of {missing}. Pass old_data= (images of the old classes), or "
                "a run folder / memory= that holds them, or use method='lwf'.")
    _check_shapes(memory, work)

    # Training set on features: the new data, plus the memory for rehearsal.
    feats, labels = feats_new, y_new + num_old
    if rehearse:
        rows = np.flatnonzero(np.isin(memory.labels, [memory.class_names.index(n)
                                                        for n in old_names]))
        mem_labels = np.asarray([old_names.index(memory.class_names[i])
                                 for i in memory.labels[rows]], "int32")
        feats = np.concatenate([feats, _features(work, memory.images[rows])])
        labels = np.concatenate([labels, mem_labels])
    _, old_head = models.split_model(work)
    teacher = np.log(np.maximum(old_head.predict(feats, batch_size=256, verbose=0), 1e-7))
    extended = _extend(work, num_new)
    _, head = models.split_model(extended)
    lwf = method.endswith("lwf")
    head.compile(keras.optimizers.Adam(learning_rate),
                 IncrementalLoss(num_old, distillation if lwf else 0.0, temperature),
                 steps_per_execution=32)  # small steps on features: less per-step overhead
    targets = np.concatenate([labels[:, None].astype("float32"), teacher], axis=1)
    weights = None
    if method != "naive":  # class-balanced cross-entropy: each class weighs the same
        counts = np.bincount(labels, minlength=num_old + num_new).astype("float64")
        weights = (len(labels) / (np.count_nonzero(counts) * counts[labels])).astype("float32")
    fit = head.fit(feats, targets, sample_weight=weights, batch_size=batch_size, epochs=epochs,
                   shuffle=True, verbose=verbose)
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    if method != "naive":
        history["weight_aligning_gamma"] = [_align_weights(extended, num_old)]

    all_names = old_names + new_class_names
    class_steps = [list(s) for s in class_steps] + [new_class_names]
    memory.select(x_new, y_new, feats_new, new_class_names)
    extended.class_steps = class_steps  # read by tlkeras.evaluate
    result = AddClassesResult(extended, all_names, class_steps, memory, history, run_dir=run_dir)
    if validation_data is not None:
        x_val, y_val = _collect(validation_data, len(all_names), "validation_data",
                                "result.class_names")
        predicted = np.argmax(extended.predict(x_val, batch_size=256, verbose=0), axis=-1)
        result.metrics = step_accuracies(y_val, predicted, class_steps)
    if run_dir is not None:
        _save_run(result, state, method, epochs)
    return result


def step_accuracies(labels, predictions, class_steps):
    """Accuracy on the old classes (every step but the last), the new ones and all.

    `class_steps` is a list of class-name lists (or of class counts) in output
    order. Returns `{"old_class_accuracy", "new_class_accuracy",
    "all_class_accuracy"}` (a group without samples gives NaN).

    >>> step_accuracies([0, 1, 2, 2], [0, 2, 2, 1], [["a", "b"], ["c"]])
    {'old_class_accuracy': 0.5, 'new_class_accuracy': 0.5, 'all_class_accuracy': 0.5}
    """
    labels, predictions = np.asarray(labels).reshape(-1), np.asarray(predictions).reshape(-1)
    sizes = [s if isinstance(s, int) else len(s) for s in class_steps]
    num_old = sum(sizes[:-1])
    correct = labels == predictions

    def mean(mask):
        return float(np.mean(correct[mask])) if np.any(mask) else float("nan")

    return {"old_class_accuracy": mean(labels < num_old),
            "new_class_accuracy": mean(labels >= num_old),
            "all_class_accuracy": mean(np.ones_like(correct))}


def load_class_steps(folder):
    """The class steps recorded in a run folder's `continual.json`, or None."""
    state = _read_state(folder)
    return state["class_steps"] if state else None


# ------------------------------------------------------------------ helpers


def _run_folder_of(path):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) if path.endswith(".keras") else path
    if not os.path.isfile(os.path.join(folder, "model.keras")):
        raise ValueError(f"add_classes: model={path!r}: expected a run folder holding model.keras "
                         "(or a keras.Model).")
    return folder


def _read_state(folder):
    path = os.path.join(folder, STATE_FILE) if folder else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _old_class_names(model, class_names, folder, state):
    _output_layer(model)  # a clear error without one
    task = models.infer_task(model)
    if task != "multiclass":
        raise ValueError(f"add_classes: expected a multiclass (softmax) model, received a {task} "
                         f"model {model.name!r}.")
    units = _output_layer(model).units
    where = "class_names"
    if class_names is None and state:
        class_names, where = [n for step in state["class_steps"] for n in step], STATE_FILE
    if class_names is None and folder:
        labels = os.path.join(folder, "labels.txt")
        config = os.path.join(folder, "config.json")
        if os.path.isfile(labels):
            with open(labels) as f:
                class_names, where = [line.rstrip("\n") for line in f if line.strip()], labels
        elif os.path.isfile(config):
            with open(config) as f:
                class_names, where = json.load(f).get("class_names"), config
    if class_names is None:
        return [str(i) for i in range(units)]
    class_names = [str(n) for n in class_names]
    if len(class_names) != units:
        raise ValueError(f"add_classes: {len(class_names)} class names (from {where}) but the "
                         f"model's output has {units} units.")
    return class_names


def _collect(data, num_classes, argument, names):
    """All `(images, int labels)` of arrays or a dataset of batches, labels checked."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
    elif hasattr(data, "as_numpy_iterator"):
        xs, ys = [], []
        for element in data.as_numpy_iterator():
            if not isinstance(element, tuple) or len(element) < 2:
                raise ValueError(f"add_classes: {argument} must yield (images, labels) batches.")
            xs.append(element[0])
            ys.append(element[1])
        if not xs:
            raise ValueError(f"add_classes: {argument} is empty.")
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        raise TypeError(f"add_classes: expected {argument} to be (images, labels) arrays or a "
                        f"tf.data.Dataset of such batches, received {type(data).__name__}.")
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(axis=1)
    y = y.reshape(-1)
    if len(x) != len(y) or not len(y):
        raise ValueError(f"add_classes: {argument} has {len(x)} images and {len(y)} labels.")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"add_classes: {argument} labels must index {names} (0 to "
                         f"{num_classes - 1}); found {int(y.min())} to {int(y.max())}.")
    return x, y.astype("int32")


def _features(model, images):
    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(images)).batch(128)
    return extract_features(model, dataset, verbose=0).features


def _resolve_memory(memory, folder, per_class, total):
    if isinstance(memory, ExemplarMemory):
        return memory
    path = memory if memory is not None else (os.path.join(folder, MEMORY_DIR) if folder else None)
    if path is not None and os.path.isfile(os.path.join(path, _MANIFEST)):
        return ExemplarMemory.load(path)
    if memory is not None:
        raise ValueError(f"add_classes: memory={memory!r} holds no {_MANIFEST}: expected a "
                         "memory folder written by add_classes.")
    if not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"add_classes: expected memory_per_class >= 1, received {per_class!r}.")
    return ExemplarMemory(np.zeros((0, 0, 0, 0), "uint8"), np.zeros((0,), "int32"), [],
                          per_class, total)


def _check_shapes(memory, model):
    if len(memory) and tuple(memory.images.shape[1:]) != tuple(model.input_shape[1:]):
        raise ValueError(f"add_classes: the exemplar memory holds images of shape "
                         f"{memory.images.shape[1:]} but the model takes {model.input_shape[1:]}.")


def _save_run(result, state, method, epochs):
    folder = result.run_dir
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".model.{os.getpid()}.tmp.keras")
    result.model.save(tmp)
    os.replace(tmp, os.path.join(folder, "model.keras"))
    result.memory.save(os.path.join(folder, MEMORY_DIR))
    with open(os.path.join(folder, "labels.txt.tmp"), "w") as f:
        f.write("\n".join(result.class_names) + "\n")
    os.replace(os.path.join(folder, "labels.txt.tmp"), os.path.join(folder, "labels.txt"))
    config_path = os.path.join(folder, "config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    config["class_names"] = result.class_names
    _write_json(config_path, config)
    steps = list((state or {}).get("steps", []))
    steps.append({"method": method, "epochs": epochs, "new_class_names": result.class_steps[-1],
                  "memory": result.memory.counts(), "metrics": result.metrics})
    _write_json(os.path.join(folder, STATE_FILE),
                {"class_steps": result.class_steps, "steps": steps})
