"""A Hydra sweep through hydra-submitit-launcher to a real SLURM cluster: every job a SLURM job with its own MLflow
run, and a job that SLURM ends early reported in one line while the others stand."""

import re

import pytest

from tests.scaleout.conftest import SCALEOUT, SLURM_SWEEP, SWEEP_S, runs_of, start_train, train_cli, wait_until

pytestmark = SCALEOUT


def returned(stdout: str) -> dict[str, float]:
    """What the launcher logged that each SLURM job returned to the sweep: {SLURM job id: value}."""
    return {job: float(value) for job, value in re.findall(r"SLURM job (\S+) returned (\S+)", stdout)}


def test_a_sweep_runs_each_job_as_a_slurm_job_with_its_own_mlflow_run(
    slurm_cluster, mlflow_server, experiment, tracked, tmp_path, prepared_root
):
    result = train_cli(slurm_cluster, tmp_path, prepared_root, *SLURM_SWEEP, "model=airbench,baseline", *tracked)
    assert result.returncode == 0, result.stderr[-3000:] + slurm_cluster.logs()

    values = returned(result.stdout + result.stderr)
    assert len(values) == 2, result.stdout[-3000:]
    records = {job: slurm_cluster.ended(job) for job in values}
    assert {record["State"] for record in records.values()} == {"COMPLETED"}
    assert {record["JobName"] for record in records.values()} == {"train"}
    assert {record["NodeList"] for record in records.values()} <= {"n0", "n1"}

    runs = runs_of(mlflow_server, experiment)
    assert len(runs) == 2
    by_job = {run.data.tags["slurm.job_id"]: run for run in runs}
    assert set(by_job) == set(values)  # each run made inside its own SLURM job
    for job, run in by_job.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["sweep.id"] == "sweep" and run.data.tags["slurm.cluster"] == "cifarlab"
        assert run.data.tags["slurm.nodes"] == records[job]["NodeList"]
        assert values[job] == pytest.approx(run.data.metrics["val/acc_best"])  # the optimized metric, returned
        assert (tmp_path / "runs" / run.info.run_id / "model.onnx").is_file()
    networks = {run.data.params["model.net._target_"].rsplit(".", 1)[1] for run in runs}
    assert networks == {"AirbenchNet", "BaselineCNN"}


def test_a_job_slurm_cancels_fails_in_one_line_and_the_other_job_stands(
    slurm_cluster, mlflow_server, experiment, tracked, tmp_path, prepared_root
):
    with start_train(
        slurm_cluster,
        tmp_path,
        prepared_root,
        *SLURM_SWEEP,
        "+callbacks.stall._target_=tests.helpers.Stall",
        "+callbacks.stall.seconds=0,600",  # job 1 waits, its run open, until it is cancelled
        *tracked,
    ) as sweep:
        wait_until(lambda: len(runs_of(mlflow_server, experiment)) == 2, "both jobs' MLflow runs", sweep)
        stalled = wait_until(lambda: running_element(slurm_cluster, 1), "job 1 running", sweep)
        slurm_cluster.run("scancel", stalled)
        stdout, stderr = sweep.communicate(timeout=SWEEP_S)

    assert sweep.returncode == 1, stderr[-3000:]
    assert slurm_cluster.ended(stalled)["State"] == "CANCELLED by 0"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    pattern = rf"error: sweep job #1 \(SLURM job {stalled}\) ended CANCELLED by 0: JOB \d+ ON n[01] CANCELLED AT \S+"
    assert re.fullmatch(pattern, errors[0]), errors[0]
    assert "Traceback" not in stderr

    array = stalled.split("_")[0]
    runs = {run.data.tags["sweep.job"]: run for run in runs_of(mlflow_server, experiment)}
    assert runs["0"].info.status == "FINISHED" and "val/acc_best" in runs["0"].data.metrics  # untouched
    assert returned(stdout + stderr) == {f"{array}_0": pytest.approx(runs["0"].data.metrics["val/acc_best"])}
    assert slurm_cluster.ended(f"{array}_0")["State"] == "COMPLETED"
    assert runs["1"].info.status == "RUNNING"  # killed with its run open: nothing told MLflow that it ended


def running_element(cluster, index: int) -> str | None:
    """The id of the sweep's array element `index` once SLURM runs it (`12_1`), else None."""
    listed = cluster.run("squeue", "-h", "-o", "%i %T").stdout.split("\n")
    return next((job for job, state in (line.split() for line in listed if line) if job.endswith(f"_{index}")
                 and state == "RUNNING"), None)  # fmt: skip


def test_a_job_at_its_time_limit_fails_in_one_line(slurm_cluster, tracked, tmp_path, prepared_root):
    # submitit ends a job on the signal SLURM sends it signal_delay_s before its time limit: here 20 s into the job
    result = train_cli(
        slurm_cluster,
        tmp_path,
        prepared_root,
        *SLURM_SWEEP,
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.signal_delay_s=40",
        "+callbacks.stall._target_=tests.helpers.Stall",
        "+callbacks.stall.seconds=600",
        *tracked,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: sweep job #0 \(SLURM job \d+\) reached its time limit \(timeout_min=1, signal_delay_s=40\): "
        r"Job not requeued because: timed-out too many times\.",
        errors[0],
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
