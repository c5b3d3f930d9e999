"""The drift evaluation (cifarlab.drift_eval, scripts/drift_eval.py) end to end on the committed sample, with a tiny
exported network (untrained: the image statistics alone must catch the corruptions that change them; the full-data
numbers are in docs/monitoring.md). Run in-process: a subprocess would spend most of its time importing torch again."""

import json
from pathlib import Path

import numpy as np
import pytest

from cifarlab import drift_eval
from cifarlab.data.prepare import ensure_prepared
from cifarlab.runtime import user_errors_exit
from cifarlab_contract.drift import image_statistics
from tests.conftest import SAMPLE


@pytest.mark.slow
def test_drift_eval_flags_corrupted_windows_and_not_clean_ones(
    tiny_model: Path, prepared_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prepared = ensure_prepared(SAMPLE, prepared_root).root  # the session copy, prepared once
    out = tmp_path / "eval.json"
    assert (
        drift_eval.main(["--model", str(tiny_model), "--prepared", str(prepared), "--out", str(out), "--repeats", "2"])
        == 0
    )
    conditions = json.loads(out.read_text())["conditions"]
    assert list(conditions) == ["validation (calibration)", "clean test", *drift_eval.CORRUPTIONS]
    assert conditions["clean test"]["windows"] == 10  # 1,000 test images, windows of 200, two shuffles
    assert conditions["clean test"]["rate"] <= 0.2 and conditions["validation (calibration)"]["rate"] <= 0.2
    for corruption in ("gaussian_noise (sigma 0.08)", "gaussian_blur (sigma 0.7)", "contrast (x0.4)"):
        assert conditions[corruption]["rate"] == 1.0, (corruption, conditions[corruption])
    assert conditions["contrast (x0.4)"]["fired"]["contrast"] == 10
    assert np.isclose(sum(conditions["clean test"]["median_score"].values()), 0, atol=1.0)
    printed = capsys.readouterr().out
    assert "clean test windows flagged" in printed and "contrast 10" in printed


def test_corruptions_change_what_they_claim_to() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(60, 200, (4, 32, 32, 3), dtype=np.uint8)
    stats = image_statistics
    before = stats(images)
    assert (stats(drift_eval.brightness(images, rng))["brightness"] > before["brightness"] + 0.05).all()
    assert (stats(drift_eval.contrast(images, rng))["contrast"] < before["contrast"] * 0.5).all()
    assert (stats(drift_eval.gaussian_blur(images, rng))["sharpness"] < before["sharpness"] * 0.7).all()
    noisy = drift_eval.gaussian_noise(images, rng)
    assert (
        noisy.dtype == np.uint8 and 12 < np.abs(noisy.astype(int) - images).mean() < 20
    )  # E|noise| = 0.08 * 255 * 0.8
    assert drift_eval.jpeg(images, rng).shape == images.shape


def test_drift_eval_without_a_model_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        user_errors_exit(drift_eval.main)(["--model", str(tmp_path / "missing.onnx"), "--quick"])  # as the script
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: model file not found: {tmp_path / 'missing.onnx'}"
