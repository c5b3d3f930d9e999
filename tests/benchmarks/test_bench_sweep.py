"""benchmarks/scaleout/bench_sweep.py: the cluster's start-up and a sweep through each launcher are timed, and the
report is written as JSON and Markdown."""

import json

import pytest

from benchmarks.scaleout import bench_sweep

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a real SLURM cluster; a benchmark


def test_a_quick_run_times_the_cluster_start_and_both_launchers(tmp_path):
    report = bench_sweep.main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "sweep.json").read_text()) == report
    assert len(report["cluster_start_s"]["runs"]) == 1 and report["cluster_start_s"]["median"] > 0
    assert list(report["sweep_s"]) == ["basic", "slurm_cpu"]
    for timing in report["sweep_s"].values():
        assert len(timing["runs"]) == 1 and timing["min"] == timing["median"] == timing["max"] > 0
    table = (tmp_path / "sweep.md").read_text()
    assert "| sweep, hydra/launcher=slurm_cpu (a SLURM array, one job per node) |" in table
    assert "SLURM / basic, medians: " in table
