"""A sweep that SLURM could not run stops before anything is queued or written, with one line saying why."""

import socket
import subprocess
from pathlib import Path

import pytest

from tests.scaleout.cluster import SlurmCluster
from tests.scaleout.conftest import SCALEOUT, train_cli

pytestmark = SCALEOUT


def refusal(result: subprocess.CompletedProcess, work: Path) -> str:
    """The one line a refused sweep printed; nothing was written for it: no run folder, sweep folder or MLflow
    store (the sweep tracks into a SQLite store under `work`)."""
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert sorted(path.name for path in work.iterdir()) == []
    return lines[0]


@pytest.fixture
def nothing_queued(slurm_cluster: SlurmCluster):
    """Fails the test if SLURM got a job during it."""
    accounted = slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID").stdout
    yield
    assert slurm_cluster.run("squeue", "-h").stdout == ""
    assert slurm_cluster.run("sacct", "-X", "-n", "-P", "-o", "JobID").stdout == accounted


def sweep(cluster: SlurmCluster, tmp_path: Path, prepared_root: Path, *overrides: str) -> tuple[str, Path]:
    work = tmp_path / "work"
    work.mkdir()
    result = train_cli(
        cluster, work, prepared_root, "-m", *overrides, f"logger.tracking_uri=sqlite:///{work / 'mlflow.db'}"
    )
    return refusal(result, work), work


def partitions(cluster: SlurmCluster) -> str:
    (node, *_) = cluster.nodes
    return f"partition cpu*: {len(cluster.nodes)} nodes, {node.cpus} CPUs, {node.memory_mb} MB, gres (null)"


@pytest.mark.parametrize(
    ("overrides", "flags", "reason"),
    [
        (  # the README's GPU command, on CPU nodes
            ["hydra/launcher=slurm"],
            "--cpus-per-task=8 --gpus-per-node=1 --mem=32GB --nodes=1 --ntasks-per-node=1 --time=120",
            "Invalid generic resource (gres) specification",
        ),
        (
            ["hydra/launcher=slurm_cpu", "hydra.launcher.partition=gpu"],
            "--cpus-per-task=1 --mem=4GB --nodes=1 --ntasks-per-node=1 --partition=gpu --time=120",
            "invalid partition specified: gpu",
        ),
        (
            ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=64"],
            "--cpus-per-task=64 --mem=4GB --nodes=1 --ntasks-per-node=1 --time=120",
            "Requested node configuration is not available",
        ),
        (
            ["hydra/launcher=slurm_cpu", "hydra.launcher.nodes=3"],
            "--cpus-per-task=1 --mem=4GB --nodes=3 --ntasks-per-node=1 --time=120",
            "Requested node configuration is not available",
        ),
    ],
    ids=["gpus-on-cpu-nodes", "unknown-partition", "more-cpus-than-a-node", "more-nodes-than-the-cluster"],
)
def test_a_request_slurm_cannot_grant_is_one_line(
    slurm_cluster, nothing_queued, tmp_path, prepared_root, overrides, flags, reason
):
    line, _ = sweep(slurm_cluster, tmp_path, prepared_root, *overrides, "model=airbench,baseline")
    expected = f"error: SLURM refuses the sweep's jobs ({flags}): {reason}; {partitions(slurm_cluster)}; "
    assert line == expected + "nothing was submitted"


def test_a_sweep_while_the_controller_is_down_is_one_line_naming_it(
    slurm_cluster, nothing_queued, tmp_path, prepared_root
):
    with slurm_cluster.down("slurmctld"):
        line, _ = sweep(slurm_cluster, tmp_path, prepared_root, "hydra/launcher=slurm_cpu", "model=airbench,baseline")
    host = socket.gethostname().split(".")[0]
    assert line == (
        f"error: the SLURM controller does not answer (Slurmctld(primary) at {host} is DOWN; configuration "
        f"{slurm_cluster.conf}): nothing was submitted"
    )


def test_a_sweep_without_accounting_is_one_line(slurm_cluster, nothing_queued, tmp_path, prepared_root):
    with slurm_cluster.down("slurmdbd"):
        line, _ = sweep(slurm_cluster, tmp_path, prepared_root, "hydra/launcher=slurm_cpu", "model=airbench,baseline")
    assert line.startswith("error: sacct cannot read SLURM's job accounting (") and line.endswith(
        "): submitit needs it to see that a job ended without a result, so nothing was submitted"
    )


def test_a_time_limit_within_submitits_warning_is_one_line(slurm_cluster, nothing_queued, tmp_path, prepared_root):
    line, _ = sweep(slurm_cluster, tmp_path, prepared_root, "hydra/launcher=slurm_cpu", "hydra.launcher.timeout_min=1")
    assert line == (
        "error: hydra.launcher.signal_delay_s=120 is not shorter than hydra.launcher.timeout_min=1 (minutes): "
        "submitit would stop each job at its start as timed out"
    )


def test_a_machine_without_slurm_is_one_line(slurm_cluster, tmp_path, prepared_root):
    empty = tmp_path / "bin"
    empty.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    result = train_cli(slurm_cluster, work, prepared_root, "-m", "hydra/launcher=slurm_cpu", env={"PATH": str(empty)})
    assert refusal(result, work) == (
        "error: sbatch, srun, sacct, scontrol, sinfo not found on PATH: hydra/launcher=slurm submits through SLURM's "
        "client commands (run from a machine of the cluster, or use hydra/launcher=basic)"
    )
