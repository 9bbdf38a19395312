"""One vocabulary across tlkeras, and the old names that still work for one release.

The names (every function and CLI command uses these):

- `unfreeze`: how much of the base trains, an int or `"all"`, counted in
  `unfreeze_unit`, default `"blocks"` (the architecture's own blocks);
  formerly `trainable_layers` (layers), `depth` and, in `tune`'s search
  space, `unfreeze_depth`.
- `head_learning_rate` (phase 1, the head on the frozen base) and
  `fine_tune_learning_rate` (phase 2's peak); formerly `learning_rate`, which
  meant phase 1 in `fine_tune` and phase 2 in `tune`'s search space.
- `run_dir`: the folder a run writes (config, history, checkpoints, logs; for
  `tune` the search's folder); formerly `log_dir` (`fine_tune`) and
  `directory` + `project_name` (`tune`). Distinct concepts keep their own
  names: `export_dir` / `--output_dir` (a deployable export, not a run),
  `cache_dir` (a cache of derived data that can be deleted).

An old name still works but emits a `FutureWarning` (shown to users by
default) naming the new one.

Example:

>>> import warnings
>>> from tlkeras import deprecation
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     deprecation.renamed("fine_tune", "log_dir", "runs/a", "run_dir")
'runs/a'
>>> str(caught[0].message)
'fine_tune: `log_dir` is deprecated and will be removed in the next release; use `run_dir`.'
"""

import warnings

__all__ = ["renamed", "RENAMED_HYPERPARAMETERS"]

# Keys of tune's search space (and best_hyperparameters): old -> new.
RENAMED_HYPERPARAMETERS = {"unfreeze_depth": "unfreeze", "learning_rate": "fine_tune_learning_rate"}


def renamed(function, old, value, new, *, stacklevel=3):
    """Warns that argument `old` of `function` is now called `new`; returns `value`."""
    warnings.warn(
        f"{function}: `{old}` is deprecated and will be removed in the next release; use "
        f"`{new}`.", FutureWarning, stacklevel=stacklevel)
    return value
