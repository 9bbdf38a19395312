"""Where augmentation lives, and how tlkeras finds it.

The model carries its augmentation: `build_transfer_model(...,
augmentation=...)` puts an "augmentation" layer in it (random only in
training; `tlkeras.export_model` drops it). `fine_tune` and `tune` also
accept augmented pipelines (e.g. `tlkeras.data.from_arrays(...,
augmentation="light")`), and they do not trust a Python attribute riding on
the dataset to tell them: a `.map(...)` drops such attributes. Instead
`pipeline_is_random` reads the pipeline's own functions for random ops, so
`train.map(lambda x, y: (x, y))` of an augmented pipeline is still seen as
augmented, and the feature cache (which would freeze one random pass) is
skipped.

Example:

>>> import numpy as np, tensorflow as tf
>>> from tlkeras import augmentation
>>> ds = tf.data.Dataset.from_tensor_slices(np.zeros((4, 2), "float32")).batch(2)
>>> augmentation.pipeline_is_random(ds)
False
>>> augmentation.pipeline_is_random(ds.map(lambda x: x + tf.random.uniform(tf.shape(x))))
True
"""

import re

from tlkeras import anatomy

__all__ = ["is_augmented", "pipeline_is_random"]

# Random ops, stateless (Keras' seeded layers) or stateful; not the dataset's own shuffling.
_RANDOM_OP = re.compile(r"Random|^Stateful(Uniform|StandardNormal|TruncatedNormal)|Multinomial")
_FUNCTION_ATTRS = ("_map_func", "_predicate", "_scan_func", "_reduce_func", "_key_func",
                   "_init_func", "_finalize_func")


def pipeline_is_random(dataset):
    """Whether any function of a `tf.data` pipeline draws random numbers (e.g. augmentation).

    Walks the pipeline from `dataset` back to its sources and reads the ops
    of every mapped function (and the functions they call). Shuffling the
    order of elements does not count.
    """
    if getattr(dataset, "augmentation", None) is not None:  # recorded by tlkeras.data
        return True
    stack, seen = [dataset], set()
    while stack:
        ds = stack.pop()
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        for attr in _FUNCTION_ATTRS:
            wrapper = getattr(ds, attr, None)
            function = getattr(wrapper, "function", None)
            if function is not None and _has_random_op(function):
                return True
        try:
            stack.extend(ds._inputs())
        except (AttributeError, NotImplementedError):
            pass
    return False


def is_augmented(model, dataset=None):
    """Whether training `model` on `dataset` sees augmented images (in the model or the data)."""
    if anatomy.has_augmentation(model):
        return True
    return dataset is not None and hasattr(dataset, "element_spec") and pipeline_is_random(dataset)


def _has_random_op(function):
    graph = function.graph.as_graph_def()
    nodes = list(graph.node)
    for library_function in graph.library.function:
        nodes.extend(library_function.node_def)
    return any(_RANDOM_OP.search(node.op) for node in nodes)
