"""The notebooks run top to bottom on small fixtures, and are committed without outputs."""

import json
import re

import numpy as np
import pytest
from mlflow import MlflowClient

from cifarlab.data.prepare import ensure_prepared
from tests.conftest import CHALLENGER_ALIAS, CHAMPION_ALIAS, ROOT, SAMPLE

NOTEBOOKS = ROOT / "notebooks"
REQUIRED = ("01_data_exploration.ipynb", "02_run_comparison.ipynb")


def execute(name: str) -> list[dict]:
    """Run a notebook as Jupyter would (its folder as working directory); return its executed cells."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as error:
        raise RuntimeError("nbclient/nbformat are not installed: run `make venv` (the 'pipeline' extra)") from error
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return notebook.cells


def text_of(cells: list[dict]) -> str:
    parts = []
    for cell in cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def images_in(cells: list[dict]) -> int:
    return sum("image/png" in output.get("data", {}) for cell in cells for output in cell.get("outputs", []))


def test_notebooks_are_committed_without_outputs():
    found = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
    assert set(REQUIRED) <= set(found)
    for name in found:
        cells = json.loads((NOTEBOOKS / name).read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: strip outputs (nbstripout)"


@pytest.mark.slow
def test_data_exploration_runs_on_the_prepared_sample(monkeypatch, prepared_root):
    dataset = ensure_prepared(str(SAMPLE), prepared_root)
    monkeypatch.setenv("CIFARLAB_DATA_SOURCE", str(dataset.root))  # a prepared folder, as the pipeline makes
    cells = execute("01_data_exploration.ipynb")
    text = text_of(cells)
    assert f"{len(dataset.train.labels)} train and {len(dataset.test.labels)} test images" in text
    assert dataset.manifest_sha256 in text
    mean = (dataset.train.images.reshape(-1, 3) / 255.0).mean(axis=0)
    printed = [float(m) for m in re.findall(r"[RGB]: mean (\d\.\d{4})", text)]
    np.testing.assert_allclose(printed, mean, atol=1e-4)
    assert images_in(cells) == 3  # class balance, sample grid, histogram


@pytest.mark.integration
def test_run_comparison_shows_the_runs_and_the_champion(monkeypatch, mlflow_server, trained_version):
    name = trained_version["name"]
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(name, CHALLENGER_ALIAS).version
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("CIFARLAB_REGISTERED_MODEL", name)
    cells = execute("02_run_comparison.ipynb")
    text = text_of(cells)
    assert f"champion: {name} version {version}, run {trained_version['run_id']}" in text
    assert trained_version["run_id"] in text and "finished runs" in text
    assert images_in(cells) == 1
