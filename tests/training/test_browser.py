"""What a user sees in a real browser (tests/browser.py): MLflow's UI on a two-job sweep, opened by the links the
project prints."""

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifarlab.mlflow_ui import compare_url, runs_url
from tests.browser import headless_chromium, page_text_once, screenshot
from tests.conftest import TINY, isolated, local_store, run_cli
from tests.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a real server and browser; it trains a sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A two-job sweep (two learning rates) tracked in a new local store, as the README's sweep runs."""
    out = tmp_path_factory.mktemp("sweep")
    uri = local_store(out)
    result = run_cli(
        "train.py",
        "-m",
        "optimizer.lr=0.1,0.2",
        *TINY,
        *isolated(out, uri),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cifar10")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    return {"uri": uri, "experiment": experiment, "runs": runs}


@pytest.fixture(scope="module")
def mlflow_ui(sweep: dict) -> Iterator[str]:
    """`mlflow ui` on the sweep's store, on loopback, as `make mlflow-ui` starts it."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "ui", "--backend-store-uri", sweep["uri"], "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not answer /health"
        time.sleep(1)
    yield base
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with headless_chromium() as session:
        yield session


def shown(value: float) -> str:
    """A metric as MLflow's compare view prints it: three decimals."""
    return f"{value:.3f}"


def test_the_compare_view_shows_both_runs_with_their_accuracy_and_time(sweep, mlflow_ui, browser):
    runs = sweep["runs"]
    url = compare_url(mlflow_ui, sweep["experiment"].experiment_id, [run.info.run_id for run in runs])
    names = [run.info.run_name for run in runs]
    accuracies = [shown(run.data.metrics["test/acc"]) for run in runs]
    text = page_text_once(browser, url, "Comparing 2 Runs", *names, "Duration:", "test/acc")
    assert "Comparing 2 Runs" in text and all(name in text for name in names), text[:2000]
    assert re.search(r"^Duration: [\d.]+s [\d.]+s$", text, re.MULTILINE), text[:2000]  # each run's time
    assert all(run.data.metrics["time/train_seconds"] > 0 for run in runs)  # the training phase alone, logged too
    metrics = text[text.index("test/acc") :]
    assert all(accuracy in metrics for accuracy in accuracies), (accuracies, metrics[:1500])
    # the metrics, not the long list of parameters above them, in the picture
    heading = browser.find_element("xpath", "//*[normalize-space(text())='test/acc']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", heading)
    assert screenshot(browser, "mlflow-compare").stat().st_size > 10_000


def test_the_runs_link_opens_on_model_training_with_each_runs_dataset(sweep, mlflow_ui, browser):
    experiment = sweep["experiment"]
    run = sweep["runs"][0]
    (dataset,) = run.inputs.dataset_inputs
    digest = dataset.dataset.digest
    assert (dataset.dataset.name, len(digest)) == ("cifar10-sample", 32)  # the prepared copy's folder
    assert run.data.tags["data.manifest_sha256"].startswith(digest)
    assert json.loads(dataset.dataset.source)["uri"].endswith("cifar10-sample.tar.gz")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    text = page_text_once(browser, runs_url(mlflow_ui, experiment.experiment_id), "Dataset", digest)
    assert "Dataset" in text and f"{dataset.dataset.name} ({digest})" in text, text[:2000]
    assert "Sort: test/acc" in text and "Token Usage" not in text, text[:2000]  # not the GenAI overview
    screenshot(browser, "mlflow-runs")
