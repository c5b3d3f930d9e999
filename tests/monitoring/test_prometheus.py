"""The Prometheus and Grafana files: promtool validates config and rules, runs the alert unit tests, and parses every
dashboard query; every query names only the service's metrics (CONTRACT-serve); the dashboards are well formed."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
PROMETHEUS = MONITORING / "prometheus"
GRAFANA = MONITORING / "grafana"
DATASOURCE_UID = "cifarlab-prometheus"

HISTOGRAMS = {
    "cifarlab_http_request_duration_seconds",
    "cifarlab_batch_size",
    "cifarlab_inference_duration_seconds",
    "cifarlab_prediction_confidence",
}
MONITORING_METRICS = {  # served by serve.drift and serve.feedback's collectors
    "cifarlab_drift_score",
    "cifarlab_drift_detected",
    "cifarlab_feedback_total",
    "cifarlab_live_accuracy",
    "cifarlab_live_precision",
    "cifarlab_live_recall",
}
CONTRACT_METRICS = {
    "cifarlab_http_requests_total",
    "cifarlab_http_requests_in_flight",
    "cifarlab_predictions_total",
    "cifarlab_model_info",
    "cifarlab_model_ready",
    "cifarlab_model_reloads_total",
    "cifarlab_shadow_dropped_total",
    *MONITORING_METRICS,
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "up",
    *(f"{name}_{suffix}" for name in HISTOGRAMS for suffix in ("bucket", "sum", "count")),
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$variant": ".*"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: run `make system-deps` (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def rule_expressions() -> dict[str, str]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((GRAFANA / "dashboards").glob("*.json"))}


def dashboard_expressions() -> dict[str, str]:
    found = {}
    for name, board in dashboards().items():
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                found[f"{name}: {panel['title']} {target['refId']}"] = expr
    return found


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords or label names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    identifiers = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*(?!\s*\(|[A-Za-z0-9_:])", text)
    return {name for name in identifiers if name not in KEYWORDS and not re.fullmatch(r"\d+[smhdwy]?|e\d*", name)}


def test_prometheus_config_and_rules_are_valid() -> None:
    config = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(PROMETHEUS / "rules.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 7 rules found" in rules.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    result = promtool("test", "rules", str(PROMETHEUS / "rules_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yml").read_text())["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    for alert in rule_expressions():
        outcomes = [bool(check["exp_alerts"]) for check in checks if check["alertname"] == alert]
        assert True in outcomes and False in outcomes, f"{alert} needs a test where it fires and one where it does not"


def test_every_query_parses(tmp_path: Path) -> None:
    # promtool parses each expression of a rule file: the dashboard queries become recording rules of one.
    expressions = {**rule_expressions(), **dashboard_expressions()}
    rules = [{"record": f"check:query_{i}", "expr": expr} for i, expr in enumerate(expressions.values())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_a_broken_query_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "q", "rules": [{"record": "a:b", "expr": "sum(rate(x[5m])"}]}]})
    )
    assert promtool("check", "rules", str(path)).returncode != 0


def test_queries_use_only_the_contract_metrics() -> None:
    expressions = {**rule_expressions(), **dashboard_expressions()}
    for where, expr in expressions.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert names <= CONTRACT_METRICS, f"{where}: unknown metrics {sorted(names - CONTRACT_METRICS)} in {expr!r}"
    used = set().union(*(metric_names(expr) for expr in expressions.values()))
    assert {"cifarlab_drift_score", "cifarlab_live_accuracy", "process_cpu_seconds_total"} <= used


def test_metric_name_extraction() -> None:
    expr = 'sum by (le) (rate(cifarlab_batch_size_bucket{variant=~"a|b"}[5m])) / on () up{job="x"} > 0.5'
    assert metric_names(expr) == {"cifarlab_batch_size_bucket", "up"}
    assert metric_names("histogram_quantile(0.99, sum by (le, route) (rate(foo_bucket[1m])))") == {"foo_bucket"}


def test_dashboards_are_generated_from_build_dashboards() -> None:
    sys.path.insert(0, str(GRAFANA))
    try:
        import build_dashboards
    finally:
        sys.path.remove(str(GRAFANA))
    built = {name: build_dashboards.render(board) for name, board in build_dashboards.build().items()}
    on_disk = {path.name: path.read_text() for path in (GRAFANA / "dashboards").glob("*.json")}
    assert built == on_disk, "dashboards are stale: run python monitoring/grafana/build_dashboards.py"


def test_dashboards_are_well_formed() -> None:
    boards = dashboards()
    assert len({board["uid"] for board in boards.values()}) == len(boards) == 2
    titles = " ".join(panel["title"] for board in boards.values() for panel in board["panels"]).lower()
    for topic in ("requests", "errors", "p50 / p99", "batch size", "class mix", "confidence", "drift", "live accuracy",
                  "cpu", "memory"):  # fmt: skip
        assert topic in titles, f"no dashboard panel about {topic}"
    for name, board in boards.items():
        assert board["schemaVersion"] >= 36 and board["panels"], name
        ids = [panel["id"] for panel in board["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, f"{name}: {panel['title']}"
            assert panel["datasource"]["uid"] == DATASOURCE_UID
            assert panel["targets"] and all(
                target["datasource"]["uid"] == DATASOURCE_UID for target in panel["targets"]
            )
            assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] == DATASOURCE_UID
            assert (
                metric_names(re.sub(r"label_values\((.*),\s*\w+\)", r"\1", variable["query"]["query"]))
                <= CONTRACT_METRICS
            )


def test_grafana_provisioning_matches_the_dashboards_and_compose() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cifarlab.yml").read_text())["providers"][0]
    compose = yaml.safe_load((MONITORING / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"serve", "mlflow", "prometheus", "grafana"}
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose["services"]["grafana"]["volumes"] if ":" in volume)
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert source["url"] == "http://prometheus:9090"
    for volume in compose["services"]["prometheus"]["volumes"] + compose["services"]["grafana"]["volumes"]:
        host = volume.split(":")[0]
        assert not host.startswith(".") or (MONITORING / host).exists(), f"compose mounts a missing path {host}"
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["job_name"] == "cifarlab"  # the job the rules and dashboards select
    assert scrape["static_configs"][0]["targets"] == ["serve:8000"]
    assert "8000:8000" in compose["services"]["serve"]["ports"]
