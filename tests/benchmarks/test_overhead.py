"""benchmarks/serving/overhead.py: each server answers through its ASGI app, and the cost per request is
reported for each concurrency."""

import json
import logging

import pytest

from benchmarks.serving import overhead
from serve.json_logs import get_logger


@pytest.fixture
def service_logger() -> logging.Logger:
    """The service's logger, made before the test runs: pytest then attaches its own capture handlers to it (it does
    so for every logger that does not propagate), and the benchmark must leave those alone."""
    return get_logger()


def test_each_server_is_measured_at_each_concurrency(tmp_path, monkeypatch, service_logger):
    # the benchmark sets these for the baseline and the floor; restored after the test
    monkeypatch.setenv("BASELINE_NET", "")
    monkeypatch.setenv("BASELINE_WEIGHTS", "")
    monkeypatch.setenv("MODEL_URI", "")
    report = overhead.main(["--requests", "28", "--concurrency", "1", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "overhead.json").read_text()) == report
    assert list(report["servers"]) == ["onnx (serve/)", "bare ASGI floor", "torch baseline"]
    for name, rows in report["servers"].items():
        assert [row["concurrency"] for row in rows] == [1, 2], name
        for row in rows:
            rounds = 28 // overhead.BLOCKS // row["concurrency"]  # rounds of `concurrency` requests per block
            assert row["requests"] == overhead.BLOCKS * rounds * row["concurrency"]
            assert 0 < row["min_ms"] <= row["cpu_ms_per_request"] <= row["max_ms"], (name, row)
    table = (tmp_path / "overhead.md").read_text()
    for name in report["servers"]:
        assert table.count(f"| {name} |") == 2, name
