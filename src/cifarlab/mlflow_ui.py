"""Links into MLflow's web UI that open on what a training user came for (checked in tests/test_browser.py).

MLflow 3's UI starts in its GenAI view (traces, token usage) unless the link asks for `workflowType=machine_learning`;
the runs table then shows each run's dataset, duration and source, and a metric only once its column is picked, which
no link can do: sorting by test accuracy is as close as a link gets. The compare view shows every run's duration,
parameters and metrics side by side.
"""

import json
import urllib.parse

LOCAL_UI = "http://127.0.0.1:5000"  # make mlflow-ui
MODEL_TRAINING = "workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    """The UI of a tracking server is the server; a local store is browsed with `make mlflow-ui`."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI


def runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs, the most accurate first."""
    order = f"orderByKey={urllib.parse.quote('metrics.`test/acc`')}&orderByAsc=false"
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}&{order}"


def compare_url(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """The compare view of these runs: durations, parameters and metrics side by side."""
    runs, experiments = json.dumps(run_ids), json.dumps([experiment_id])
    query = urllib.parse.urlencode({"runs": runs, "experiments": experiments}, quote_via=urllib.parse.quote)
    return f"{ui_base(tracking_uri)}/#/compare-runs?{query}&{MODEL_TRAINING}"
