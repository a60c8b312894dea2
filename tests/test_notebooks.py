"""Every ``notebooks/*.ipynb`` runs top to bottom on the tiny backbone, and follows the notebook convention.

The notebooks are collected with a glob at collection time, so a notebook anyone adds is executed too. Each
one runs in a fresh Jupyter kernel of THIS interpreter (a kernelspec written into a temporary folder that
points at ``sys.executable``, so no user-level or venv-level kernelspec is needed) with

* ``ZOO_NOTEBOOK_MODEL=tiny-llama`` (the notebook's ``FAST`` mode) and ``ZOO_NOTEBOOK_OUT=<tmp_path>`` (the
  only place it may write),
* ``OMP_NUM_THREADS=1`` and the Hugging Face hub / datasets offline,
* a per-cell timeout; any cell error fails the test with the cell's traceback.

The convention (helper rules, "Notebooks convention"): the first code cell sets
``MODEL = os.environ.get("ZOO_NOTEBOOK_MODEL", ...)``, ``FAST = MODEL == "tiny-llama"`` and
``OUT = Path(os.environ.get("ZOO_NOTEBOOK_OUT", ...))``; the committed copy is executed (outputs saved).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # generous: a slow CI machine must not fail a notebook that runs in seconds here
KERNEL_NAME = "zoo-test-python"

MODEL_LINE = re.compile(r"""^\s*MODEL\s*=\s*os\.environ\.get\(\s*["']ZOO_NOTEBOOK_MODEL["']""", re.M)
FAST_LINE = re.compile(r"""^\s*FAST\s*=\s*MODEL\s*==\s*["']tiny-llama["']""", re.M)
OUT_LINE = re.compile(r"""^\s*OUT\s*=\s*Path\(\s*os\.environ\.get\(\s*["']ZOO_NOTEBOOK_OUT["']""", re.M)


def convention_problems(notebook: dict) -> list[str]:
    """What a notebook (nbformat JSON as a dict) gets wrong about the convention; empty when it follows it."""
    code = [cell for cell in notebook.get("cells", []) if cell.get("cell_type") == "code"]
    if not code:
        return ["no code cell"]
    first = code[0]["source"]
    first = "".join(first) if isinstance(first, list) else first
    problems = []
    if not MODEL_LINE.search(first):
        problems.append('the first code cell does not set MODEL = os.environ.get("ZOO_NOTEBOOK_MODEL", ...)')
    if not FAST_LINE.search(first):
        problems.append('the first code cell does not set FAST = MODEL == "tiny-llama"')
    if not OUT_LINE.search(first):
        problems.append('the first code cell does not set '
                        'OUT = Path(os.environ.get("ZOO_NOTEBOOK_OUT", ...))')
    unexecuted = [i for i, cell in enumerate(code) if cell.get("execution_count") is None]
    if unexecuted:
        problems.append(f"code cells {unexecuted} have no saved execution (commit the executed notebook)")
    return problems


def _ids(paths: list[Path]) -> list[str]:
    return [path.stem for path in paths]


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_follows_the_convention(path):
    assert convention_problems(json.loads(path.read_text(encoding="utf-8"))) == []


def test_convention_check_catches_a_notebook_that_ignores_the_model():
    """The structural check can fail: a notebook with a hard-coded backbone and no saved outputs."""
    bad = {"cells": [
        {"cell_type": "markdown", "source": "MODEL = os.environ.get('ZOO_NOTEBOOK_MODEL')"},
        {"cell_type": "code", "execution_count": None,
         "source": ['MODEL = "smollm2-135m"\n', "FAST = False\n"]},
    ]}
    problems = convention_problems(bad)
    assert len(problems) == 4, problems
    good_first = ('import os\nfrom pathlib import Path\n'
                  'MODEL = os.environ.get("ZOO_NOTEBOOK_MODEL", "smollm2-135m")\n'
                  'FAST = MODEL == "tiny-llama"\n'
                  'OUT = Path(os.environ.get("ZOO_NOTEBOOK_OUT", "/tmp/x"))\n')
    good = {"cells": [{"cell_type": "code", "execution_count": 1, "source": good_first}]}
    assert convention_problems(good) == []


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernelspec for this interpreter in a temporary folder (independent of any installed kernelspec)."""
    from jupyter_client.kernelspec import KernelSpecManager

    root = tmp_path_factory.mktemp("kernels")
    folder = root / KERNEL_NAME
    folder.mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "zoo test kernel", "language": "python"}
    (folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return KernelSpecManager(kernel_dirs=[str(root)])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_on_the_tiny_backbone(path, tmp_path, monkeypatch, kernel_spec_manager):
    import nbformat
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    env = {"ZOO_NOTEBOOK_MODEL": "tiny-llama", "ZOO_NOTEBOOK_OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}  # (a debugger warning of the kernel on frozen modules)
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    (tmp_path / "out").mkdir()
    notebook = nbformat.read(path, as_version=4)
    manager = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(notebook, km=manager, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                            allow_errors=False, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the failing cell and traceback) on any error
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert errors == []
