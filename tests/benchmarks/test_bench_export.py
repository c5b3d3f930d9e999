"""benchmarks/training/bench_export.py, end to end with one process per variant: both variants export the default
network in a fresh process, and the table and the JSON report hold both."""

import json
import subprocess
import sys

import pytest

from benchmarks.training.bench_export import VARIANTS

pytestmark = pytest.mark.slow  # two fresh processes that import torch and export


def test_the_export_benchmark_reports_both_variants(tmp_path):
    output = tmp_path / "export.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.training.bench_export", "--runs", "1", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["runs"] == 1 and set(report["seconds"]) == set(VARIANTS) == set(report["median_s"])
    for name, times in report["seconds"].items():
        assert len(times) == 1 and 0.1 < times[0] < 120 and report["median_s"][name] == times[0]
    rows = [line for line in result.stdout.splitlines() if line.startswith(tuple(VARIANTS))]
    assert len(rows) == 2 and rows[0].endswith("1.00x"), result.stdout
