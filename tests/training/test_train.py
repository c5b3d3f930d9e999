"""End-to-end training: real runs on the committed sample, tracked in a real MLflow store."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from mlflow import MlflowClient

from cifarlab.data.prepare import load_prepared, source_slug
from cifarlab.errors import ConfigError
from cifarlab.export.onnx import read_metadata
from cifarlab.models.module import ImageClassifier
from cifarlab.train import train
from cifarlab_contract.classes import CIFAR10_CLASSES
from tests.conftest import SAMPLE, TINY, isolated, run_cli

pytestmark = pytest.mark.slow  # trains models end to end


def _only_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("cifar10")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_short_run_writes_checkpoint_onnx_and_mlflow_record(compose_train, tracking_uri, tmp_path):
    cfg = compose_train(*TINY, f"logger.tracking_uri={tracking_uri}")
    returned = train(cfg)

    client, run = _only_run(tracking_uri)
    run_dir = tmp_path / "runs" / run.info.run_id
    assert cfg.run_id == run.info.run_id and cfg.paths.output_dir == str(run_dir)
    assert run.info.status == "FINISHED"
    assert returned == pytest.approx(run.data.metrics["val/acc_best"])

    # the folder named by the run id holds everything the run made
    for name in (
        "config.yaml",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "model.onnx",
        "test_metrics.json",
        "confusion_matrix.png",
    ):
        assert (run_dir / name).is_file(), name
    assert "drift_reference" in read_metadata(run_dir / "model.onnx")  # statistics for the server's drift monitor

    params = run.data.params
    assert params["model.net.widths"] == "[16, 32, 32]"
    assert params["optimizer.lr"] == str(cfg.optimizer.lr) and params["trainer.max_epochs"] == "2"
    manifest_sha = load_prepared(Path(cfg.data.prepared_root) / source_slug(str(SAMPLE))).manifest_sha256
    tags = run.data.tags
    assert tags["data.manifest_sha256"] == manifest_sha
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("True", "False")
    assert tags["system.torch"] == torch.__version__

    metrics = run.data.metrics
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", "test/f1_macro"):
        assert 0.0 <= metrics[name] < 10.0, name
    assert {f"test/recall/{c}" for c in CIFAR10_CLASSES} <= set(metrics)
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2  # one per epoch

    test_report = json.loads((run_dir / "test_metrics.json").read_text())
    assert test_report["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    # debug=limit tests on 2 batches of 128: the run says its test metrics come from a subset, and how large
    assert test_report["images"] == metrics["test/images"] == 256
    assert tags["test.images"] == "a subset, 256 of the 1,000 test images"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "test_metrics.json", "confusion_matrix.png", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    logged_models = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in logged_models] == [run.info.run_id]
    # registered as the challenger of configs/logger/mlflow.yaml's model (scripts/promote.py decides on champion)
    assert client.get_model_version_by_alias(cfg.logger.registered_model_name, "challenger").run_id == run.info.run_id

    metadata = read_metadata(run_dir / "model.onnx")
    assert json.loads(metadata["classes"]) == list(CIFAR10_CLASSES)
    assert metadata["run_id"] == run.info.run_id and metadata["data_manifest_sha256"] == manifest_sha


def test_onnx_export_matches_best_checkpoint_on_test_images(compose_train, tmp_path, prepared_root):
    cfg = compose_train(*TINY, "logger=csv")
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    images = load_prepared(prepared_root / source_slug(str(SAMPLE))).test.images[::7]

    module = ImageClassifier.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    with torch.no_grad():
        expected = torch.softmax(module.net.eval()(torch.from_numpy(images)), 1).numpy()
    session = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (input_,), (output,) = session.get_inputs(), session.get_outputs()
    assert (input_.name, input_.type, input_.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert (output.name, output.type, output.shape[1]) == ("logits", "tensor(float)", 10)
    logits = session.run(None, {"images": images})[0]
    actual = torch.softmax(torch.from_numpy(logits), 1).numpy()
    assert np.abs(actual - expected).max() <= 1e-4
    assert (actual.argmax(1) == expected.argmax(1)).all()
    # the CSV logger writes into the run folder
    assert (run_dir / "csv" / "metrics.csv").read_text().count("val/acc") >= 1


@pytest.mark.parametrize("model", ["airbench", "baseline", "resnet18"])
def test_fast_dev_run_trains_one_batch_of_each_model(compose_train, model):
    cfg = compose_train(
        f"model={model}", "debug=fast_dev_run", f"data.source={SAMPLE}", "data.batch_size=16", "data.eval_batch_size=16"
    )
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert (run_dir / "model.onnx").is_file()  # fast_dev_run saves no checkpoint: the final weights are exported
    report = json.loads((run_dir / "test_metrics.json").read_text())
    assert 0.0 <= report["acc"] <= 1.0 and set(report) >= {"loss", "f1_macro", "precision/cat"}


def test_resumed_run_reaches_the_same_weights(compose_train, tracking_uri, tmp_path):
    def final_state(cfg):
        return {
            k: v.clone()
            for k, v in torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)[
                "state_dict"
            ].items()
        }

    straight = compose_train(*TINY, "logger=none", "test=false")
    train(straight)

    crashing = compose_train(
        *TINY,
        f"logger.tracking_uri={tracking_uri}",
        "test=false",
        "+callbacks.crash._target_=tests.helpers.CrashAfterEpoch",
        "+callbacks.crash.epoch=0",
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing)
    last = Path(crashing.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0

    resumed = compose_train(*TINY, f"logger.tracking_uri={tracking_uri}", "test=false", f"ckpt_path={last}")
    train(resumed)
    assert resumed.run_id == crashing.run_id  # same run, same folder, same MLflow record
    _, run = _only_run(tracking_uri)
    assert run.info.run_id == crashing.run_id and run.info.status == "FINISHED"
    assert run.data.params["ckpt_path"] == "None"  # params keep the first start's values...
    assert json.loads(run.data.tags["resume.changed_params"]) == {"ckpt_path": str(last)}  # ...and resumes are noted

    expected, actual = final_state(straight), final_state(resumed)
    assert expected.keys() == actual.keys()
    differences = {name: (actual[name].float() - expected[name].float()).abs().max().item() for name in expected}
    assert max(differences.values()) <= 1e-6, {k: v for k, v in differences.items() if v > 1e-6}


def test_missing_checkpoint_is_a_config_error(compose_train):
    with pytest.raises(ConfigError, match=r"checkpoint not found: nowhere\.ckpt"):
        train(compose_train(*TINY, "logger=none", "ckpt_path=nowhere.ckpt"))


def test_multirun_makes_one_mlflow_run_per_job_tagged_with_the_sweep(tmp_path, tracking_uri, prepared_root):
    result = run_cli(
        "train.py",
        "-m",
        "model=airbench,baseline",
        *TINY[:3],
        f"data.source={SAMPLE}",
        *isolated(tmp_path, tracking_uri, prepared_root),
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "test=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id])
    assert len(runs) == 2
    assert {r.data.tags["sweep.id"] for r in runs} == {"sweep"}
    assert {r.data.tags["sweep.job"] for r in runs} == {"0", "1"}
    assert {r.data.params["model.net._target_"].rsplit(".", 1)[1] for r in runs} == {"AirbenchNet", "BaselineCNN"}
    names = {r.info.run_name for r in runs}
    assert names == {
        "debug=limit,model.net.widths=[16,32,32],model=airbench,test=False,trainer.accelerator=cpu",
        "debug=limit,model.net.widths=[16,32,32],model=baseline,test=False,trainer.accelerator=cpu",
    }
    assert all((tmp_path / "runs" / r.info.run_id / "model.onnx").is_file() for r in runs)

    table = run_cli("scripts/compare_runs.py", "--tracking-uri", tracking_uri, "--sweep", "sweep")
    assert table.returncode == 0, table.stderr
    rows, link = table.stdout.split("\n\n")
    lines = rows.splitlines()
    assert "val/acc_best" in lines[0] and len(lines) == 4
    assert {line.split()[1] for line in lines[2:]} == names
    assert link.startswith("In the MLflow UI: ") and all(r.info.run_id in link for r in runs)


@pytest.mark.integration
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, prepared_root):
    result = run_cli(
        "train.py",
        "trainer=ddp",
        "trainer.devices=2",
        *TINY,
        "logger=none",
        "test=false",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"data.prepared_root={prepared_root}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "+callbacks.dump._target_=tests.helpers.DumpWeights",
        f"+callbacks.dump.dirpath={tmp_path / 'ranks'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 6  # 2 epochs x 3 batches, in lockstep
    untrained = ImageClassifier(**_tiny_model_kwargs()).state_dict()
    changed = [k for k in untrained if "num_batches" not in k and not torch.equal(untrained[k], rank0["state"][k])]
    assert changed, "the weights did not train"
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name


def _tiny_model_kwargs() -> dict:
    return {
        "net": {"_target_": "cifarlab.models.airbench.AirbenchNet", "widths": [16, 32, 32]},
        "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.05},
    }


def test_mps_on_a_machine_without_it_is_one_line_and_fast():
    result = run_cli("train.py", "model=resnet18", "trainer.accelerator=mps", timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: MPS is not available on this machine; use trainer.accelerator=auto (or trainer=cpu)"
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_unknown_config_option_is_a_readable_error():
    result = run_cli("train.py", "model=nope", timeout=60)
    assert result.returncode == 1
    assert "Could not find 'model/nope'" in result.stderr and "resnet18" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrongly_typed_value_is_one_line(tmp_path, prepared_root):
    result = run_cli(
        "train.py",
        *TINY,
        "logger=none",
        "optimizer.lr=-1",
        f"paths.runs_dir={tmp_path}",
        f"data.prepared_root={prepared_root}",
        timeout=120,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line == "error: optimizer torch.optim.SGD rejects its configuration: Invalid learning rate: -1"
    assert "Traceback" not in result.stderr


def test_data_folder_with_a_missing_class_is_one_line(tmp_path):
    broken = tmp_path / "broken"
    for split in ("train", "test"):
        for cls in CIFAR10_CLASSES[:9]:  # no trucks
            folder = broken / split / cls
            folder.mkdir(parents=True)
            from PIL import Image

            Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "0.png")
    result = run_cli(
        "train.py",
        "logger=none",
        f"data.source={broken}",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"data.prepared_root={tmp_path / 'prepared'}",
        timeout=120,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "truck" in last
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path, tracking_uri, prepared_root):
    result = run_cli(
        "train.py",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        *TINY,
        *isolated(tmp_path, tracking_uri, prepared_root),
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "test=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id])
    assert len(runs) == 2
    learning_rates = {float(r.data.params["optimizer.lr"]) for r in runs}
    assert len(learning_rates) == 2 and all(0.005 <= lr <= 0.5 for lr in learning_rates)
    results = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    best = max(r.data.metrics["val/acc_best"] for r in runs)
    assert f"best_value: {best}" in results
