"""What every run records: config, code version, data identity, system, results and artefacts.

The MLflow side goes through the Lightning MLFlowLogger's client for params, tags and metrics, and through
the fluent API (attached to the same run) only to log the ONNX model, which has no client-level call.
"""

import contextlib
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from cifarlab.data.prepare import PreparedDataset
from cifarlab.errors import ConfigError
from cifarlab.registry import ONNX_SHA256_TAG
from cifarlab.runtime import file_sha256

MAX_PARAM_LENGTH = 6000  # MLflow rejects longer param values
MAX_DIGEST_LENGTH = 32  # of a dataset input's digest: MLflow takes at most 36 characters, a sha256 has 64
# Marks an experiment as model training, so that MLflow's UI opens it on its runs, not on the GenAI overview of traces
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
MAX_PARAMS_PER_BATCH = 100  # and more params in one log_batch call
CHAMPION_ALIAS = "champion"  # the registered model version production serves
CHALLENGER_ALIAS = "challenger"  # the version being tried against it (every training run registers one)


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
    version = _log_onnx_model(logger, onnx_path, registered_name)
    if version is not None:
        client.set_model_version_tag(registered_name, version, ONNX_SHA256_TAG, file_sha256(onnx_path))
        # The newest model is what is being tried; scripts/promote.py decides whether it becomes the champion.
        client.set_registered_model_alias(registered_name, CHALLENGER_ALIAS, version)
    return version


def _log_onnx_model(logger: MLFlowLogger, onnx_path: Path, registered_name: str | None) -> str | None:
    import mlflow
    import onnx
    import onnxruntime
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = onnx.load(str(onnx_path))
    classes = len(json.loads({p.key: p.value for p in model.metadata_props}["classes"]))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "logits")]),
    )
    mlflow.set_tracking_uri(logger._tracking_uri)
    with mlflow.start_run(run_id=logger.run_id):
        info = mlflow.onnx.log_model(
            model,
            name="onnx_model",
            signature=signature,
            pip_requirements=[f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"],
            save_as_external_data=False,
            registered_model_name=registered_name,
        )
    version = info.registered_model_version
    return None if version is None else str(version)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of the experiment `name`, created if missing (Lightning would create it too, with a warning that a
    first run in a new store has nothing wrong with), and marked as a model-training experiment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        # fails when a sweep's parallel job created it first, or when it is deleted (checked below)
        with contextlib.suppress(MlflowException):
            client.create_experiment(name, artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        experiment = client.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise ConfigError(f"the MLflow experiment {name!r} is deleted: restore it, or set logger.experiment_name")
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # made by an older version, or by hand
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def log_dataset(logger: MLFlowLogger, dataset: PreparedDataset) -> None:
    """The run's data as an MLflow dataset input, shown in the runs table's Dataset column: the prepared copy's name,
    its manifest's sha256 (cut to MLflow's digest length) and where it was prepared from."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = resolve_dataset_source(dataset.manifest["source_resolved"])
    # MetaDataset's profile is abstract in MLflow's stubs only: the class is meant to be used as it is
    meta = MetaDataset(source, name=dataset.root.name, digest=dataset.manifest_sha256[:MAX_DIGEST_LENGTH])  # type: ignore[abstract]
    context = InputTag(key="mlflow.data.context", value="train")
    logger.experiment.log_inputs(logger.run_id, datasets=[DatasetInput(meta._to_mlflow_entity(), tags=[context])])


def log_train_time(logger: MLFlowLogger, seconds: float, cpu_seconds: float | None) -> None:
    """The training phase's duration as metrics, so that a comparison of runs shows time beside accuracy."""
    logger.experiment.log_metric(logger.run_id, "time/train_seconds", seconds)
    if cpu_seconds is not None:
        logger.experiment.log_metric(logger.run_id, "time/train_cpu_seconds", cpu_seconds)


class RegisteringMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, plus the registered-model name the run's ONNX export is registered under."""

    def __init__(self, *args: Any, registered_model_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.registered_model_name = registered_model_name


def mlflow_logger(
    tracking_uri: str,
    experiment_name: str = "cifar10",
    run_name: str | None = None,
    run_id: str | None = None,
    artifact_location: str | None = None,
    tags: Mapping[str, str] | None = None,
    registered_model_name: str | None = None,
) -> RegisteringMLFlowLogger:
    """An MLFlowLogger whose artefacts sit beside a local SQLite store (not in the current directory, where
    MLflow would put them); with a server, the server decides where artefacts go. With `registered_model_name`,
    the run's ONNX export becomes a new version of that registered model, with the alias `challenger`."""
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (database.parent / "artifacts").resolve().as_uri()
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
    )
