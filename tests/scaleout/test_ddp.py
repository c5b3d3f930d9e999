"""DDP across two nodes (gloo): under SLURM, one job of two tasks on two nodes started by srun, the ranks set by
Lightning's SLURM environment; and by hand with the README's rendezvous variables, two processes on loopback. Both
ranks end with identical weights, and rank 0 alone writes the run folder, the MLflow run and the ONNX export."""

from pathlib import Path

import torch
from mlflow import MlflowClient

from tests.containers import free_port
from tests.scaleout.conftest import SCALEOUT, SLURM_SWEEP, SWEEP_S, runs_of, start_train, train_cli
from tests.scaleout.test_sweep import returned

pytestmark = SCALEOUT

TWO_NODES = ["trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", "test=false"]


def dump_weights(work: Path) -> list[str]:
    return ["+callbacks.dump._target_=tests.helpers.DumpWeights", f"+callbacks.dump.dirpath={work / 'ranks'}"]


def test_ddp_across_two_slurm_nodes(slurm_cluster, mlflow_server, experiment, tracked, tmp_path, prepared_root):
    result = train_cli(
        slurm_cluster,
        tmp_path,
        prepared_root,
        *SLURM_SWEEP,
        "hydra.launcher.nodes=2",  # one task on each node
        *TWO_NODES,
        *dump_weights(tmp_path),
        *tracked,
        env={"MASTER_ADDR": "127.0.0.1"},  # the nodes' names (n0, n1) are not in DNS
    )
    assert result.returncode == 0, result.stderr[-3000:] + slurm_cluster.logs()
    (job,) = returned(result.stdout + result.stderr)
    assert slurm_cluster.ended(job)["NodeList"] == "n[0-1]"
    ranks = identical_ranks(tmp_path / "ranks")
    assert [(r["host"], r["node_rank"], r["world_size"]) for r in ranks] == [("n0", 0, 2), ("n1", 1, 2)]
    run = only_run_written_by_rank_zero(tmp_path, mlflow_server, experiment, ranks[0])
    assert run.data.tags["slurm.job_id"] == job and run.data.tags["slurm.nodes"] == "n[0-1]"


def test_ddp_with_the_readme_rendezvous_variables_on_loopback(
    mlflow_server, experiment, tracked, tmp_path, prepared_root
):
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    nodes = [
        start_train(
            None,
            tmp_path,
            prepared_root,
            *TWO_NODES,
            *dump_weights(tmp_path),
            *tracked,
            f"hydra.run.dir={tmp_path / 'hydra' / f'node{rank}'}",
            env={**rendezvous, "NODE_RANK": str(rank)},
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        with node:
            _, stderr = node.communicate(timeout=SWEEP_S)
        assert node.returncode == 0, stderr[-3000:]
    ranks = identical_ranks(tmp_path / "ranks")
    assert [(r["host"], r["node_rank"], r["world_size"]) for r in ranks] == [(None, 0, 2), (None, 1, 2)]
    run = only_run_written_by_rank_zero(tmp_path, mlflow_server, experiment, ranks[0])
    assert "slurm.job_id" not in run.data.tags


def identical_ranks(folder: Path) -> list[dict]:
    """The two ranks' final records, checked to hold the same weights after the same steps."""
    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert sorted(path.name for path in folder.iterdir()) == ["rank0.pt", "rank1.pt"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6  # 2 epochs x 3 batches, in lockstep
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    return ranks


def only_run_written_by_rank_zero(work: Path, tracking_uri: str, experiment: str, rank0: dict):
    """One MLflow run and one run folder, holding rank 0's final weights, a checkpoint and the ONNX export."""
    (run,) = runs_of(tracking_uri, experiment)
    assert run.info.status == "FINISHED"
    assert [path.name for path in (work / "runs").iterdir()] == [run.info.run_id]
    folder = work / "runs" / run.info.run_id
    assert (folder / "model.onnx").is_file() and (folder / "checkpoints" / "best.ckpt").is_file()
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert all(torch.equal(last[name], value) for name, value in rank0["state"].items())
    client = MlflowClient(tracking_uri)
    assert {"checkpoints", "config.yaml"} <= {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    models = client.search_logged_models([run.info.experiment_id])  # the ONNX export, logged as an MLflow model
    assert [model.source_run_id for model in models] == [run.info.run_id]
    return run
