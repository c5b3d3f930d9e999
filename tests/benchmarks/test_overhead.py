"""benchmarks/serving/overhead.py: both servers answer through their ASGI apps, and the cost per request is
reported for each concurrency."""

import json

from benchmarks.serving import overhead


def test_both_servers_are_measured_at_each_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("BASELINE_NET", "")  # the benchmark sets it for the baseline; restored after the test
    monkeypatch.setenv("BASELINE_WEIGHTS", "")
    report = overhead.main(["--requests", "28", "--concurrency", "1", "2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "overhead.json").read_text()) == report
    assert set(report["servers"]) == {"onnx (serve/)", "torch baseline"}
    for name, rows in report["servers"].items():
        assert [row["concurrency"] for row in rows] == [1, 2], name
        for row in rows:
            rounds = 28 // overhead.BLOCKS // row["concurrency"]  # rounds of `concurrency` requests per block
            assert row["requests"] == overhead.BLOCKS * rounds * row["concurrency"]
            assert 0 < row["min_ms"] <= row["cpu_ms_per_request"] <= row["max_ms"], (name, row)
    table = (tmp_path / "overhead.md").read_text()
    assert table.count("| onnx (serve/) |") == 2 and table.count("| torch baseline |") == 2
