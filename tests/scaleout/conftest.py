"""The SLURM cluster the scale-out tests submit to (one per session and xdist worker: each worker's tests see only
their own jobs in its queue and accounting), the MLflow server its jobs report to, and how a test runs train.py."""

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, TINY, cli_env
from tests.scaleout.cluster import SlurmCluster

SCALEOUT = [pytest.mark.integration, pytest.mark.slow]  # a real SLURM cluster; each test runs train.py end to end
SLURM_SWEEP = ("-m", "hydra/launcher=slurm_cpu")  # the README's sweep on CPU nodes, its launcher as configured
SWEEP_S = 600  # two tiny jobs take about a minute here
POLL_S = 0.5


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="cifarlab-slurm-")))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def experiment(request: pytest.FixtureRequest) -> str:
    """An MLflow experiment of the test's own on the shared server: its runs are the test's runs."""
    return f"scaleout-{request.node.name}"


@pytest.fixture
def tracked(mlflow_server: str, experiment: str) -> list[str]:
    """The overrides that send a run to the test's own experiment on the MLflow server (tests/servers.py): jobs on
    a cluster's nodes report to a server."""
    return [f"logger.tracking_uri={mlflow_server}", f"logger.experiment_name={experiment}"]


def start_train(
    cluster: SlurmCluster | None, work: Path, prepared_root: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`python train.py <overrides>` as a user on the cluster's login node starts it (SLURM_CONF names the cluster),
    or on a machine without SLURM: tiny CPU runs on the committed sample, everything they write under `work`, no
    model registered."""
    command = [
        sys.executable,
        "train.py",
        *overrides,
        *TINY,
        "logger.registered_model_name=null",
        f"paths.runs_dir={work / 'runs'}",
        f"paths.log_dir={work / 'logs'}",
        f"hydra.sweep.dir={work / 'sweep'}",
        f"data.prepared_root={prepared_root}",
    ]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=cli_env({**({"SLURM_CONF": str(cluster.conf)} if cluster else {}), **(env or {})}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def train_cli(
    cluster: SlurmCluster | None, work: Path, prepared_root: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """start_train, waited for."""
    with start_train(cluster, work, prepared_root, *overrides, env=env) as process:
        stdout, stderr = process.communicate(timeout=SWEEP_S)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_until(ready, what: str, process: subprocess.Popen, timeout: float = SWEEP_S):
    """Poll `ready()` until it returns something true, failing if `process` (the sweep) ends first."""
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            raise AssertionError(
                f"the sweep ended ({process.returncode}) before {what}:\n{stdout[-2000:]}{stderr[-3000:]}"
            )
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(POLL_S)
    return found


def runs_of(tracking_uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])
