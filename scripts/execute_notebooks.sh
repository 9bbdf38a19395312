#!/usr/bin/env bash
# Re-executes the notebooks in place with their full parameters (real offline data), so that they are
# stored with their outputs: scripts/execute_notebooks.sh [quickstart unfreeze_search ...]
# Each runs in a fresh temporary folder (its run folders stay out of the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
unset TLKERAS_NOTEBOOK_SMOKE
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=2
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(quickstart unfreeze_search text_classification)
for name in "${names[@]}"; do
  echo "executing notebooks/$name.ipynb"
  python - "notebooks/$name.ipynb" <<'PY'
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient

path = sys.argv[1]
notebook = nbformat.read(path, as_version=4)
start = time.time()
with tempfile.TemporaryDirectory() as folder:
    NotebookClient(notebook, timeout=1800, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": folder}}).execute()
nbformat.write(notebook, path)
print(f"{path}: {time.time() - start:.0f} s")
PY
done
