"""Loading a base's weights from any Keras file that holds its architecture.

`build_transfer_model(..., weights=FILE)` accepts the files found in the wild:

- a Keras 3 `.weights.h5` (`model.save_weights`), a `.keras` archive (its
  `model.weights.h5` is read), or a legacy `.h5` (Keras 2, or Keras 3's
  `model.save("x.h5")`; a whole model or weights only);
- the base alone, or a whole fine-tuned model holding it: nested as one layer
  (e.g. `mobilenetv2_1.00_160`) or flattened into the top level (as
  `keras.Model(base.input, Dense(3)(base.output))` saves it);
- saved at any input size the weights allow (convolutions do not depend on it).

The base is found by matching its layers' names and weight shapes against the
file, not by position: every layer of the base that has weights must be found,
under one common folder of the file (its top level, or one nested model).
Nothing is assigned unless all of them are. When no folder matches, the error
lists what the file holds and the nearest candidate.

Example:

>>> import os, tempfile, keras, tlkeras
>>> base = keras.applications.MobileNetV2(
...     input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
>>> whole = keras.Sequential([keras.Input((32, 32, 3)), base, keras.layers.Flatten(),
...                           keras.layers.Dense(2)])
>>> path = os.path.join(tempfile.mkdtemp(), "whole.keras")
>>> whole.save(path)
>>> other = keras.applications.MobileNetV2(
...     input_shape=(48, 48, 3), alpha=0.35, include_top=False, weights=None)
>>> load_base_weights(other, path)
>>> all((a == b).all() for a, b in zip(other.get_weights(), base.get_weights()))
True
"""

import io
import os
import warnings
import zipfile

import h5py
import numpy as np

__all__ = ["load_base_weights"]

_EXTENSIONS = (".weights.h5", ".h5", ".hdf5", ".keras")


def load_base_weights(base, path):
    """Loads the weights of `base` from a `.weights.h5`, legacy `.h5` or `.keras` file.

    The file may hold `base` alone or a whole model around it (nested or
    flattened), saved at any input size; see the module docstring.

    Args:
        base: the `keras.Model` (or layer) to load into, already built.
        path: the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupt, or holds no weights matching `base`
            (the message names the layers found and the nearest candidate).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights={path!r}: no such file (expected a .weights.h5, .h5 or .keras file)."
        )
    if not path.endswith(_EXTENSIONS):
        raise ValueError(f"weights={path!r}: expected a file ending in .weights.h5, .h5 or .keras.")
    wanted = _base_layers(base)
    if not wanted:
        raise ValueError(f"weights={path!r}: the base {base.name!r} has no weights to load.")
    try:
        with _open(path) as (f, legacy):
            stored = _legacy_layers(f) if legacy else _keras3_layers(f)
            plan, nearest = _match(wanted, stored)
            if plan is None:
                message = _mismatch_message(path, base, wanted, stored, nearest)
            else:
                for variable, dataset in plan:
                    variable.assign(np.asarray(dataset))
                return
    except (OSError, zipfile.BadZipFile, KeyError, EOFError) as error:
        raise ValueError(
            f"weights={path!r}: the file is corrupt or truncated ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); save or download it again."
        ) from error
    if path.endswith(".weights.h5") and not legacy:
        try:  # e.g. layers named differently: Keras's own loading, by structure
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                base.load_weights(path)
            if not caught:  # Keras only warns when it skips layers
                return
        except Exception:  # noqa: BLE001 - the error below explains better
            pass
    raise ValueError(message)


class _open:
    """Opens `path` as `(h5py.File, is_legacy_h5)`; a `.keras` zip's weights are read in memory."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        if self.path.endswith(".keras"):
            with zipfile.ZipFile(self.path) as archive:
                data = archive.read("model.weights.h5")
            self.file = h5py.File(io.BytesIO(data), "r")
        else:
            self.file = h5py.File(self.path, "r")
        f = self.file
        legacy = "layer_names" in f.attrs or "model_weights" in f
        return f, legacy

    def __exit__(self, *exc):
        self.file.close()


def _base_layers(base):
    """`[(path, variables)]`: each layer of `base` owning variables, by its name path."""
    found = []

    def walk(layer, prefix):
        for child in layer._flatten_layers(include_self=False, recursive=False):
            path = prefix + (child.name,)
            own = list(child._trainable_variables) + list(child._non_trainable_variables)
            if own:
                found.append((path, own))
            walk(child, path)

    walk(base, ())
    own = list(base._trainable_variables) + list(base._non_trainable_variables)
    return [((base.name,), own)] + found if own else found


def _legacy_layers(f):
    """`{path: [(variable name, dataset)]}` of a legacy (Keras 2 style) HDF5 file, in order."""
    root = f["model_weights"] if "model_weights" in f else f
    layers = {}
    for group_name in _strings(root.attrs.get("layer_names", [])):
        group = root[group_name]
        for weight_name in _strings(group.attrs.get("weight_names", [])):
            parts = weight_name.split("/")
            path = tuple(parts[:-1]) if parts[0] == group_name else (group_name, *parts[:-1])
            layers.setdefault(path, []).append((parts[-1].split(":")[0], group[weight_name]))
    return layers


def _keras3_layers(f):
    """`{path: [(index, dataset)]}` of a Keras 3 weights file (`.weights.h5`, `.keras`)."""
    layers = {}

    def walk(group, prefix):
        for key, child in group.items():
            skip = key == "vars" or (not prefix and key == "optimizer")
            if skip or not isinstance(child, h5py.Group):
                continue
            if key == "layers":
                walk(child, prefix)
                continue
            variables = child.get("vars")
            name = key
            if isinstance(variables, h5py.Group):
                name = variables.attrs.get("name", key)
                name = name.decode() if isinstance(name, bytes) else str(name)
                if len(variables):
                    layers.setdefault(prefix + (name,), [
                        (i, variables[i]) for i in sorted(variables, key=int)
                    ])
            walk(child, prefix + (name,))

    walk(f, ())
    return layers


def _strings(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _assign(variables, stored):
    """`[(variable, dataset)]` if `stored` fits `variables` (by name, else in order), else None."""
    if len(stored) != len(variables):
        return None
    by_name = dict(stored)
    names = [v.name for v in variables]
    if len(by_name) == len(stored) and set(names) == set(by_name):
        pairs = [(v, by_name[v.name]) for v in variables]
    else:
        pairs = list(zip(variables, (dataset for _, dataset in stored)))
    if all(tuple(v.shape) == tuple(d.shape) for v, d in pairs):
        return pairs
    return None


def _match(wanted, stored):
    """(assignments, None) for the folder of the file holding every layer, or (None, nearest)."""
    prefixes = {()}
    for path in stored:
        prefixes.update(path[:i] for i in range(1, len(path)))
    best = None
    for prefix in sorted(prefixes, key=lambda p: (len(p), p)):
        plan, hits, first_miss = [], 0, None
        for path, variables in wanted:
            pairs = _assign(variables, stored.get(prefix + path, []))
            if pairs is None:
                first_miss = first_miss or (path, variables, stored.get(prefix + path))
            else:
                plan += pairs
                hits += 1
        if hits == len(wanted):
            return plan, None
        if best is None or hits > best[1]:
            best = (prefix, hits, first_miss)
    return None, best


def _shapes(entries):
    return [tuple(e.shape) for e in entries]


def _mismatch_message(path, base, wanted, stored, nearest):
    folders = {}
    for layer_path in stored:
        folders.setdefault(layer_path[:-1], []).append(layer_path)
    found = "; ".join(
        f"{'/'.join(folder) or 'top level'}: {len(paths)} layers, e.g. "
        + ", ".join(f"{'/'.join(p[len(folder):])!r} {_shapes([d for _, d in stored[p]])}"
                    for p in paths[:2])
        for folder, paths in list(folders.items())[:6]
    ) or "no weights at all"
    example = f"{'/'.join(wanted[0][0])!r} {_shapes(wanted[0][1])}"
    text = (
        f"weights={path!r}: nothing in this file matches the architecture {base.name!r}: it needs "
        f"{len(wanted)} layers with weights (e.g. {example}), found by name and shape. "
        f"The file holds {found}."
    )
    if nearest is not None:
        prefix, hits, (miss_path, variables, entries) = nearest
        had = "nothing" if entries is None else _shapes([d for _, d in entries])
        text += (
            f" Nearest candidate: {'/'.join(prefix) or 'the top level'!r} with {hits} of "
            f"{len(wanted)} layers matching; e.g. layer {'/'.join(miss_path)!r} needs "
            f"{_shapes(variables)}, the file has {had}."
        )
    return text + " Pass a file saved from the same architecture (and variant, e.g. alpha)."
