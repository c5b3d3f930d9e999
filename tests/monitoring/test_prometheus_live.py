"""A real Prometheus on loopback scrapes the real service (three variants, feedback on, traffic that drifts) with
the project's scrape config and rules: every dashboard and rule query returns data, and every rule evaluates."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
import yaml

from tests.monitoring.test_prometheus import PROMETHEUS, dashboard_expressions, rule_expressions
from tests.serve.conftest import Server, Traffic

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a real Prometheus, scraping the trained model's server

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
def prometheus(ab_server: Server, ab_traffic: Traffic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run `make system-deps` (apt-get install prometheus)")
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS / "rules.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [ab_server.url.removeprefix("http://")]}]
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


def test_the_service_is_scraped_as_job_cifarlab(prometheus: int) -> None:
    (target,) = api(prometheus, "targets")["data"]["activeTargets"]
    assert target["labels"]["job"] == "cifarlab" and target["health"] == "up", target


def test_every_dashboard_and_rule_query_returns_data(prometheus: int) -> None:
    quiet_alerts = {"CifarlabLiveAccuracyLow", "CifarlabTargetDown", "CifarlabNoTraffic", "CifarlabModelNotReady"}
    quiet_alerts |= {"CifarlabHighErrorRate", "CifarlabHighLatencyP99"}  # no 5xx, fast: not firing
    expressions = {**rule_expressions(), **dashboard_expressions()}
    for where, expr in expressions.items():
        query = expr.replace("[5m]", "[1m]")  # rate() over the last minute: the traffic is seconds old
        result = api(prometheus, "query", query=query)
        assert result["status"] == "success", (where, result)
        if where not in quiet_alerts:
            assert result["data"]["result"], f"{where}: no data for {query!r}"
    assert len(expressions) >= 30


def test_the_rules_load_and_evaluate_cleanly(prometheus: int) -> None:
    groups = api(prometheus, "rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == set(rule_expressions())
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    drift = next(rule for rule in rules if rule["name"] == "CifarlabDriftDetected")
    assert drift["state"] == "pending"  # the noise traffic: firing after its 15 minutes
    # champion saw 20+ noise images; the canary's window is not full, the challenger's restarted at its reload
    assert {alert["labels"]["variant"] for alert in drift["alerts"]} == {"champion"}
