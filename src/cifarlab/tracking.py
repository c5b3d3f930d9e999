"""What every run records: config, code version, data identity, system, results and artefacts.

The MLflow side goes through the Lightning MLFlowLogger's client for params, tags and metrics; the ONNX model is
logged and registered by the model registry's own code (cifarlab_lifecycle.registry.register_onnx).
"""

import json
import os
import platform
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from cifarlab.data.prepare import PreparedDataset
from cifarlab.errors import ConfigError
from cifarlab_lifecycle.registry import default_artifact_location, ensure_experiment, register_onnx

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values
MAX_DIGEST_LENGTH = 32  # of a dataset input's digest: MLflow takes at most 36 characters, a sha256 has 64
MAX_PARAMS_PER_BATCH = 100  # and more params in one log_batch call


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def as_params(config: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flatten(config).items()}


def git_state(root: str | os.PathLike) -> dict[str, str]:
    """The commit and whether the work tree differs from it ("unknown" outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain")))}
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}


def system_info(trainer_accelerator: str) -> dict[str, str]:
    info = {
        "system.python": platform.python_version(),
        "system.platform": platform.platform(),
        "system.cpu_count": str(os.cpu_count()),
        "system.torch": torch.__version__,
        "system.lightning": lightning.__version__,
        "system.accelerator": trainer_accelerator,
    }
    if torch.cuda.is_available():
        info["system.gpu"] = torch.cuda.get_device_name(0)
    return info


def find_mlflow_logger(loggers: list[Logger]) -> MLFlowLogger | None:
    return next((logger for logger in loggers if isinstance(logger, MLFlowLogger)), None)


def log_run_start(logger: MLFlowLogger, config: Mapping[str, Any], tags: Mapping[str, str]) -> None:
    """Log the config as params and the run's tags. A resumed run keeps its params (MLflow forbids changing
    them): only new keys are added, and the values that changed are recorded in the tag resume.changed_params."""
    client, run_id = logger.experiment, logger.run_id
    params = as_params(config)
    logged = client.get_run(run_id).data.params
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
    # Through the client: Lightning's log_hyperparams cuts values at 250 characters, MLflow accepts 6000.
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=new[start : start + MAX_PARAMS_PER_BATCH])
    if changed:
        client.set_tag(run_id, "resume.changed_params", json.dumps(changed)[:MAX_PARAM_LENGTH])
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_run_end(logger: MLFlowLogger, run_dir: Path, onnx_path: Path | None, checkpoint: str | None) -> str | None:
    """Upload the run folder's files, the best checkpoint and the ONNX model (as an MLflow model); register the
    model when the logger names a registered model. Returns the new model version, if one was registered."""
    client, run_id = logger.experiment, logger.run_id
    for name in ("config.yaml", "test_metrics.json", "confusion_matrix.png"):
        if (run_dir / name).exists():
            client.log_artifact(run_id, str(run_dir / name))
    if checkpoint:
        client.log_artifact(run_id, checkpoint, artifact_path="checkpoints")
    if onnx_path is None or not onnx_path.exists():
        return None
    registered_name = getattr(logger, "registered_model_name", None)
    challenger_alias = getattr(logger, "challenger_alias", None)
    assert run_id is not None  # the client calls above created the run
    return register_onnx(logger._tracking_uri, run_id, onnx_path, registered_name, challenger_alias)


def log_dataset(logger: MLFlowLogger, dataset: PreparedDataset) -> None:
    """The run's data as an MLflow dataset input, shown in the runs table's Dataset column: the prepared copy's name,
    its manifest's sha256 (cut to MLflow's digest length) and where it was prepared from."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and says so on every resolve; both are the same class
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(dataset.manifest["source_resolved"])
    # MetaDataset's profile is abstract in MLflow's stubs only: the class is meant to be used as it is
    meta = MetaDataset(source, name=dataset.root.name, digest=dataset.manifest_sha256[:MAX_DIGEST_LENGTH])  # type: ignore[abstract]
    context = InputTag(key="mlflow.data.context", value="train")
    inputs = [DatasetInput(meta._to_mlflow_entity(), tags=[context])]
    try:
        logger.experiment.log_inputs(logger.run_id, datasets=inputs)
    except MlflowException as error:
        # The server gets or creates the dataset in two steps: sweep jobs starting together on one experiment race
        # to create it, and the loser's second try finds the winner's row.
        if "UNIQUE constraint failed: datasets" not in str(error):
            raise
        logger.experiment.log_inputs(logger.run_id, datasets=inputs)


def log_train_time(logger: MLFlowLogger, seconds: float, cpu_seconds: float | None) -> None:
    """The training phase's duration as metrics, so that a comparison of runs shows time beside accuracy."""
    logger.experiment.log_metric(logger.run_id, "time/train_seconds", seconds)
    if cpu_seconds is not None:
        logger.experiment.log_metric(logger.run_id, "time/train_cpu_seconds", cpu_seconds)


class RegisteringMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, plus the registered model the run's ONNX export becomes a version of, and the
    alias that version gets. (`mlflow_logger` has made the experiment first, safely when a sweep's jobs start at
    once: `ensure_experiment`.)"""

    def __init__(
        self,
        *args: Any,
        registered_model_name: str | None = None,
        challenger_alias: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.registered_model_name = registered_model_name
        self.challenger_alias = challenger_alias


def mlflow_logger(
    tracking_uri: str,
    experiment_name: str = "cifar10",
    run_name: str | None = None,
    run_id: str | None = None,
    artifact_location: str | None = None,
    tags: Mapping[str, str] | None = None,
    registered_model_name: str | None = None,
    challenger_alias: str | None = None,
) -> RegisteringMLFlowLogger:
    """An MLFlowLogger whose artefacts sit beside a local SQLite store (not in the current directory, where
    MLflow would put them); with a server, the server decides where artefacts go. With `registered_model_name`,
    the run's ONNX export becomes a new version of that registered model, aliased `challenger_alias`."""
    if registered_model_name and not challenger_alias:
        raise ConfigError(f"registering {registered_model_name!r} needs the challenger alias (configs/registry.yaml)")
    artifact_location = artifact_location or default_artifact_location(tracking_uri)
    if run_id is None:
        ensure_experiment(MlflowClient(tracking_uri), experiment_name, artifact_location)
    return RegisteringMLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name,
        run_id=run_id,
        tracking_uri=tracking_uri,
        artifact_location=artifact_location,
        tags=dict(tags or {}),
        registered_model_name=registered_model_name,
        challenger_alias=challenger_alias,
    )
