"""The notebooks in colabs/: saved clean, and each runs top to bottom without an error."""
import json
import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS] == ["01_tour.ipynb", "02_dypa.ipynb",
                                         "03_augmentations.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_without_outputs_and_starts_with_the_setup(path):
  notebook = json.loads(path.read_text())
  assert notebook["nbformat"] == 4
  assert notebook["metadata"]["kernelspec"]["name"] == "python3"
  code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
  for cell in code:
    assert cell["outputs"] == [] and cell["execution_count"] is None, (
        f"{path.name} is saved with outputs: clear them before committing.")
  setup = "".join(code[0]["source"])
  assert "google.colab" in setup and "pip" in setup and "MTL_JAX_ROOT" in setup


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
  import nbclient
  import nbformat

  # A working copy: the runs the notebook writes (runs/...) land in tmp_path, not the checkout.
  copy = tmp_path / path.name
  shutil.copyfile(path, copy)
  notebook = nbformat.read(copy, as_version=4)
  monkeypatch.setenv("MTL_JAX_ROOT", str(ROOT))  # The kernel inherits the environment.
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # Raises CellExecutionError, with the cell and traceback, on any error.
  errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  assert os.path.isdir(tmp_path / "runs")
