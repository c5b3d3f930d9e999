"""scripts/drift_eval.py end to end on the committed sample, with a tiny exported network (untrained: the image
statistics alone must catch the corruptions that change them; the full-data numbers are in the README)."""

import json
from pathlib import Path

import numpy as np
import pytest

from cifarlab.data.prepare import CIFAR10_CLASSES, ensure_prepared, source_slug
from cifarlab.export.onnx import contract_metadata, export_onnx
from tests.conftest import SAMPLE, run_cli
from tests.export.test_onnx import tiny_net

SCRIPT = "scripts/drift_eval.py"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    metadata = contract_metadata(CIFAR10_CLASSES, "run-tiny", "ef" * 32)
    return export_onnx(tiny_net(), tmp_path_factory.mktemp("model") / "model.onnx", metadata)


def test_drift_eval_flags_corrupted_windows_and_not_clean_ones(model: Path, prepared_root: Path, tmp_path: Path):
    prepared = ensure_prepared(SAMPLE, prepared_root / source_slug(str(SAMPLE))).root
    out = tmp_path / "eval.json"
    result = run_cli(SCRIPT, "--model", str(model), "--prepared", str(prepared), "--out", str(out), "--repeats", "2")
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    conditions = results["conditions"]
    assert list(conditions) == [
        "validation (calibration)",
        "clean test",
        "gaussian_noise (sigma 0.08)",
        "gaussian_blur (sigma 0.7)",
        "brightness (+0.15 V)",
        "contrast (x0.4)",
        "jpeg (quality 58)",
    ]
    assert conditions["clean test"]["windows"] == 10  # 1,000 test images, windows of 200, two shuffles
    assert conditions["clean test"]["rate"] <= 0.2 and conditions["validation (calibration)"]["rate"] <= 0.2
    for corruption in ("gaussian_noise (sigma 0.08)", "gaussian_blur (sigma 0.7)", "contrast (x0.4)"):
        assert conditions[corruption]["rate"] == 1.0, (corruption, conditions[corruption])
    assert conditions["contrast (x0.4)"]["fired"]["contrast"] == 10
    assert np.isclose(sum(conditions["clean test"]["median_score"].values()), 0, atol=1.0)
    assert "clean test windows flagged" in result.stdout and "rate" in result.stdout.splitlines()[2]


def test_drift_eval_without_a_model_is_one_line_error(tmp_path: Path) -> None:
    result = run_cli(SCRIPT, "--model", str(tmp_path / "missing.onnx"), "--quick")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: model file not found: {tmp_path / 'missing.onnx'}"
