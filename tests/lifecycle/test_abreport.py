"""The A/B report (cifarlab_lifecycle.abreport) on synthetic feedback manifests, in the format
serve.feedback.FeedbackStore writes, and against a real Prometheus exposition served on loopback. Run in-process,
through the same one-line error handling as scripts/ab_report.py; one run as a subprocess checks that command."""

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import MetricsHandler

from cifarlab.runtime import user_errors_exit
from cifarlab_contract.feedback import MANIFEST_FILE, read_manifest
from cifarlab_lifecycle import abreport
from serve.feedback import FeedbackStore
from tests.conftest import run_cli

ab_report = user_errors_exit(abreport.main)  # as scripts/ab_report.py runs it

CLASSES = ["cat", "dog"]
VARIANTS = ("champion", "challenger")  # the script's default names


def record(index: int, variant: str, correct: bool, version: str, shadows: dict | None = None) -> dict:
    """One manifest line as FeedbackStore writes it."""
    line = {
        "request_id": f"req-{index}",
        "image_index": 0,
        "label": "cat",
        "predicted": "cat" if correct else "dog",
        "correct": correct,
        "confidence": 0.9,
        "variant": variant,
        "version": version,
        "path": f"cat/req-{index}.png",
        "received_at": "2026-11-25T12:00:00.000+00:00",
    }
    return line if shadows is None else {**line, "shadows": shadows}


def split_traffic(champion: tuple[int, int], challenger: tuple[int, int], versions: tuple[str, str] = ("1", "2")):
    """(count, correct) per variant, each answering its own requests, interleaved in a random order."""
    rng = np.random.default_rng(0)
    lines = []
    for (count, correct), variant, version in zip((champion, challenger), VARIANTS, versions, strict=True):
        hits = rng.permutation(np.arange(count) < correct)
        lines += [(variant, bool(hit), version) for hit in hits]
    order = rng.permutation(len(lines))
    return [record(i, *lines[j]) for i, j in enumerate(order)]


def shadowed(champion: np.ndarray, challenger: np.ndarray, version: str = "2") -> list[dict]:
    """Every request answered by the champion, the challenger predicting the same image in shadow."""
    return [
        record(i, "champion", bool(a), "1", {"challenger": {"predicted": "?", "version": version, "correct": bool(b)}})
        for i, (a, b) in enumerate(zip(champion, challenger, strict=True))
    ]


def write_manifest(folder: Path, lines: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / MANIFEST_FILE
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    return folder


def report(folder: Path, *args: str, capsys: pytest.CaptureFixture) -> tuple[dict, str]:
    out = folder / "report.json"
    assert ab_report(["--feedback", str(folder), "--json", str(out), *args]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def one_line_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        ab_report(list(args))
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize(
    ("challenger_correct", "action"),
    [(345, "promote"), (290, "keep"), (321, "collect")],
)
def test_split_traffic_is_compared_as_independent_samples(
    tmp_path: Path, capsys: pytest.CaptureFixture, challenger_correct: int, action: str
) -> None:
    folder = write_manifest(tmp_path, split_traffic((3600, 2880), (400, challenger_correct)))
    data, printed = report(folder, capsys=capsys)
    comparison = data["comparison"]
    assert comparison["design"] == "independent" and comparison["test"] == "two-proportion z-test"
    assert (comparison["champion"]["count"], comparison["challenger"]["correct"]) == (3600, challenger_correct)
    assert comparison["champion_versions"] == ["1"] and comparison["challenger_versions"] == ["2"]
    assert data["recommendation"]["action"] == action
    rows = {row["variant"]: row for row in data["variants"]}
    assert rows["champion"]["accuracy"] == 0.8 and rows["challenger"]["feedback"] == 400
    assert rows["champion"]["interval"][0] < 0.8 < rows["champion"]["interval"][1]
    assert f"recommendation: {action.upper()}" in printed and "independent comparison" in printed
    if action == "collect":
        assert data["recommendation"]["more_samples"] > 100_000  # to see 0.25 points at a 9:1 split


def test_shadow_traffic_is_compared_as_pairs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(1)
    champion = rng.random(600) < 0.8
    challenger = champion.copy()
    wrong_only_for_champion = np.flatnonzero(~champion)[:60]
    challenger[wrong_only_for_champion] = True  # the challenger fixes 60 of the champion's mistakes ...
    challenger[np.flatnonzero(champion)[:20]] = False  # ... and makes 20 of its own
    data, printed = report(write_manifest(tmp_path, shadowed(champion, challenger)), capsys=capsys)
    comparison = data["comparison"]
    assert comparison["design"] == "paired" and comparison["test"] == "McNemar exact test"
    assert comparison["discordant"] == [20, 60] and comparison["samples"] == 600
    assert comparison["challenger_versions"] == ["2"]
    assert data["recommendation"]["action"] == "promote"
    roles = {(row["variant"], row["role"]) for row in data["variants"]}
    assert roles == {("champion", "answer"), ("challenger", "shadow")}
    assert "paired comparison (McNemar exact test), 600 images both predicted" in printed


def test_few_samples_still_report_but_keep_collecting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_manifest(tmp_path, split_traffic((300, 150), (30, 30)))
    data, printed = report(folder, "--min-samples", "50", capsys=capsys)
    assert data["recommendation"]["action"] == "collect" and data["comparison"]["p_value"] < 0.001
    assert "only 30 feedback samples for a variant, fewer than the minimum 50" in printed


def test_torn_last_line_is_ignored_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_manifest(tmp_path, split_traffic((200, 160), (200, 170)), tail='{"request_id": "req-to')
    before = (folder / MANIFEST_FILE).read_bytes()
    data, printed = report(folder, capsys=capsys)
    assert data["records"] == 400 and data["torn_bytes_ignored"] == len('{"request_id": "req-to')
    assert "an incomplete last line (22 bytes)" in printed
    assert (folder / MANIFEST_FILE).read_bytes() == before  # a live server may be appending: read only
    assert FeedbackStore(folder, CLASSES).get("req-399~0")  # the server's own reader agrees, and leaves it too
    assert (folder / MANIFEST_FILE).read_bytes() == before


def test_manifests_without_shadows_or_image_index_load(tmp_path: Path) -> None:
    """Lines written before the A/B fields existed still load, with their defaults."""
    line = record(0, "champion", True, "1")
    del line["image_index"]
    (loaded,), _ = read_manifest(write_manifest(tmp_path, [line]) / MANIFEST_FILE)
    assert (loaded.image_index, loaded.shadows, loaded.variant) == (0, {}, "champion")


@pytest.fixture
def metrics_url() -> Iterator[str]:
    """A real Prometheus exposition on loopback with the service's prediction counter."""
    registry = CollectorRegistry()
    predictions = Counter("cifarlab_predictions_total", "predicted labels", ["variant", "label"], registry=registry)
    predictions.labels(variant="champion", label="cat").inc(6000)
    predictions.labels(variant="champion", label="dog").inc(1200)
    predictions.labels(variant="challenger", label="cat").inc(800)
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(registry))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


def test_metrics_give_traffic_share_and_feedback_coverage(
    tmp_path: Path, metrics_url: str, capsys: pytest.CaptureFixture
) -> None:
    folder = write_manifest(tmp_path, split_traffic((3600, 2880), (400, 320)))
    data, printed = report(folder, "--metrics-url", metrics_url, capsys=capsys)
    rows = {row["variant"]: row for row in data["variants"]}
    assert rows["champion"]["predictions"] == 7200 and rows["challenger"]["predictions"] == 800
    assert rows["champion"]["traffic_share"] == pytest.approx(0.9) and rows["challenger"]["coverage"] == 0.5
    assert "90.0%" in printed and "50.0%" in printed


def test_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEEDBACK_DIR", raising=False)
    assert "pass --feedback DIR" in one_line_error(capsys)
    assert "nowhere: no such feedback folder" in one_line_error(capsys, "--feedback", str(tmp_path / "nowhere"))
    write_manifest(tmp_path / "empty", [], tail='{"torn')
    assert "holds no complete feedback records" in one_line_error(capsys, "--feedback", str(tmp_path / "empty"))
    folder = str(write_manifest(tmp_path / "ok", split_traffic((10, 5), (10, 5))))
    line = one_line_error(capsys, "--feedback", folder, "--challenger", "nobody")
    assert "variant 'nobody' has no feedback" in line and "(variants there: challenger, champion)" in line
    assert "name two different variants" in one_line_error(capsys, "--feedback", folder, "--champion", "challenger")
    dead = "http://127.0.0.1:9/metrics"
    assert f"cannot read metrics from {dead}" in one_line_error(capsys, "--feedback", folder, "--metrics-url", dead)


def test_promote_without_a_promote_recommendation_touches_no_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = write_manifest(tmp_path, split_traffic((300, 240), (300, 241)))
    data, printed = report(folder, "--promote", "--tracking-uri", "http://127.0.0.1:9", capsys=capsys)
    assert data["promotion"] == {"promoted": False, "reason": "the recommendation is 'collect', not 'promote'"}
    assert "--promote: nothing promoted" in printed


def test_command_line_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = run_cli("scripts/ab_report.py", "--feedback", str(tmp_path / "missing"), timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {tmp_path / 'missing'}: no such feedback folder")
    assert result.stderr.count("\n") == 1
