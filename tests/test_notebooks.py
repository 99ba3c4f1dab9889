"""The walkthrough notebooks run top to bottom (quick settings) and their own checks pass.

Each notebook reads ``DDPM_NOTEBOOK_QUICK=1`` in its parameter cell (a few training steps, tiny samplers) and ends
with assertions on what it shows, so a regression in the library fails here. The kernel is this interpreter
(a kernelspec written to a temporary ``JUPYTER_PATH``), not whatever ``python3`` kernel is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["01_forward_and_reverse.ipynb", "02_train_sample_evaluate.ipynb", "03_classifier_guidance.ipynb"]
CELL_TIMEOUT_S = 300


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``python3`` kernelspec for this interpreter and the environment the notebook kernel inherits."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("DDPM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("DDPM_NOTEBOOK_OUTPUT", str(tmp_path / "outputs"))
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))  # no writes to ~/.cache from the tests
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One thread: on a shared 2-core machine OpenMP oversubscription slows small convolutions down ~10x.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def test_notebooks_are_committed_without_outputs() -> None:
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code, name
        assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{name} has outputs"
        assert "DDPM_NOTEBOOK_QUICK" in code[0].source, f"{name}: the first code cell must read the quick flag"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name: str, kernel_env: Path) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:  # show the notebook's traceback, not nbclient's
        pytest.fail(f"{name} failed:\n{str(error)[-4000:]}", pytrace=False)
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.outputs if out.get("output_type") == "stream")
    assert "all checks passed" in printed, f"{name} did not reach its checks"
    assert any((kernel_env / "outputs").rglob("*.png")), f"{name} saved no figure"
