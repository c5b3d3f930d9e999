"""A real Prometheus on loopback scrapes the monitoring-side collectors (drift, feedback) and loads the project's
rules: every dashboard and rule query over those metrics returns data, and every rule evaluates without error.
(The service's own HTTP and model metrics come from serve/app.py; the same check extends to them once it runs here.)"""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from serve.drift import DriftCollector, DriftMonitor, build_reference
from serve.feedback import FeedbackCollector, FeedbackStore, Prediction, RecentPredictions
from tests.monitoring.test_drift import CLASSES, confident_probabilities, textured_images
from tests.monitoring.test_prometheus import (
    MONITORING_METRICS,
    PROMETHEUS,
    dashboard_expressions,
    metric_names,
    rule_expressions,
)

STARTUP_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_for(condition, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prometheus exited: {process.stderr.read().decode()[-2000:]}"
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prometheus: {what} within {STARTUP_S} s")


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The drift and feedback collectors served on loopback, with a drifted window and some feedback."""
    rng = np.random.default_rng(0)
    reference = build_reference(textured_images(500, rng), confident_probabilities(500, rng), CLASSES)
    monitor = DriftMonitor(reference, window=100)
    monitor.observe(textured_images(100, rng, level=0.9), confident_probabilities(100, rng))
    store = FeedbackStore(tmp_path_factory.mktemp("feedback"), CLASSES)
    recent = RecentPredictions()
    for i in range(6):
        image = textured_images(1, rng)[0]
        recent.add(Prediction(f"r{i}", image, CLASSES[i % 2], 0.8, "champion", "1"))
        store.submit(f"r{i}", CLASSES[0], recent)
    registry = CollectorRegistry()
    registry.register(DriftCollector({"champion": monitor}))
    registry.register(FeedbackCollector(store))
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield port
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def prometheus(exporter: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make system-deps` (apt-get install prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS / "rules.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{exporter}"]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: api(port, "query", query="up")["data"]["result"], "a first scrape", process)
        # increase()/rate() need two samples in range, and rules need an evaluation after them
        wait_for(
            lambda: len(api(port, "query", query="cifarlab_live_accuracy[1m]")["data"]["result"][0]["values"]) >= 3,
            "three scrapes",
            process,
        )
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_exporter_is_scraped_as_job_cifarlab(prometheus: int) -> None:
    (target,) = api(prometheus, "targets")["data"]["activeTargets"]
    assert target["labels"]["job"] == "cifarlab" and target["health"] == "up", target


def test_every_monitoring_query_returns_data(prometheus: int) -> None:
    expressions = {**rule_expressions(), **dashboard_expressions()}
    checked = 0
    for where, expr in expressions.items():
        names = metric_names(expr)
        if not names <= MONITORING_METRICS | {"up"}:
            continue  # a service metric: served by serve/app.py
        query = expr.replace("[5m]", "[1m]") if "rate(" in expr or "increase(" in expr else expr
        result = api(prometheus, "query", query=query)
        assert result["status"] == "success", (where, result)
        if where not in {"CifarlabLiveAccuracyLow", "CifarlabTargetDown", "CifarlabNoTraffic"}:  # alerts: not firing
            assert result["data"]["result"], f"{where}: no data for {query!r}"
        checked += 1
    assert checked >= 9


def test_the_rules_load_and_evaluate_cleanly(prometheus: int) -> None:
    groups = api(prometheus, "rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(rule_expressions())
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    drift = next(rule for rule in rules if rule["name"] == "CifarlabDriftDetected")
    assert drift["state"] == "pending"  # the drifted window: firing after its 15 minutes
    (alert,) = drift["alerts"]
    assert alert["labels"]["variant"] == "champion"
