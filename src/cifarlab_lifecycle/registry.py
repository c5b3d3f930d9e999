"""The MLflow model registry as the lifecycle uses it: registering an ONNX export, the versions aliases name, and
the tags that record each decision.

Every training run registers its ONNX export as a new version aliased challenger (cifarlab.tracking calls
`register_onnx`); the inference service loads `models:/<name>@champion`. The aliases are configs/registry.yaml's.
"""

import contextlib
import getpass
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from cifarlab_contract.errors import UserError
from cifarlab_contract.files import file_sha256
from cifarlab_contract.model import IMAGE_SHAPE, INPUT_DTYPE, INPUT_NAME, OUTPUT_DTYPE, OUTPUT_NAME, metadata_classes

ONNX_FILE = "model.onnx"  # the file mlflow.onnx.log_model writes inside the logged model
ONNX_SHA256_TAG = "onnx_sha256"  # on each registered version: its exported file's digest
# Marks an experiment as model training, so that MLflow's UI opens it on its runs, not on the GenAI overview of traces
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class RegistryError(UserError):
    """The registry does not hold what the command needs (a model, an alias), or a version cannot be evaluated."""


def registry_config(overrides: list[str]) -> DictConfig:
    """configs/promote.yaml as scripts/promote.py composes it (tracking URI, registered model, aliases), for the
    commands that are not Hydra apps; the configs are found under $PROJECT_ROOT, which entry points set."""
    configs = Path(os.environ.get("PROJECT_ROOT", os.getcwd())) / "configs"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(configs.resolve()), version_base="1.3"):
            return compose("promote", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artefacts: beside a local SQLite store (not in the current directory, where
    MLflow would put them); None with a server, which decides itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    return (database.parent / "artifacts").resolve().as_uri()


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
            raise RegistryError(f"the MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore)")
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:  # made by an older version, or by hand
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


def start_run(tracking_uri: str, experiment_name: str, run_name: str) -> str:
    """A new run in `experiment_name` (created if missing); returns its id."""
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = ensure_experiment(client, experiment_name, default_artifact_location(tracking_uri))
    return str(client.create_run(experiment_id, run_name=run_name).info.run_id)


def register_onnx(
    tracking_uri: str, run_id: str, onnx_path: Path, name: str | None, challenger_alias: str | None
) -> str | None:
    """Log `onnx_path` to run `run_id` as an MLflow ONNX model with the contract's signature. With `name`, it
    becomes a new version of that registered model, tagged with its file's sha256 and aliased `challenger_alias`;
    returns that version (None when nothing was registered)."""
    import mlflow
    import numpy as np
    import onnx
    import onnxruntime
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = onnx.load(str(onnx_path))
    classes = metadata_classes({p.key: p.value for p in model.metadata_props})
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(INPUT_DTYPE), (-1, *IMAGE_SHAPE), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(OUTPUT_DTYPE), (-1, len(classes)), OUTPUT_NAME)]),
    )
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            model,
            name="onnx_model",
            signature=signature,
            pip_requirements=[f"onnxruntime=={onnxruntime.__version__}", f"numpy=={np.__version__}"],
            save_as_external_data=False,
            registered_model_name=name,
        )
    if name is None or info.registered_model_version is None:
        return None
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri=tracking_uri)
    client.set_model_version_tag(name, version, ONNX_SHA256_TAG, file_sha256(onnx_path))
    if challenger_alias:
        # The newest model is what is being tried; promotion decides whether it becomes the champion.
        client.set_registered_model_alias(name, challenger_alias, version)
    return version


def registry_client(cfg: DictConfig) -> MlflowClient:
    """The client of `cfg.tracking_uri`, once `cfg.model_name` names a registered model."""
    if not cfg.get("model_name"):
        raise RegistryError("no registered model name: set model_name= (or logger.registered_model_name=)")
    return MlflowClient(tracking_uri=cfg.tracking_uri)


def aliased(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    version = aliased_or_none(client, name, alias)
    if version is None:
        raise RegistryError(
            f"no version of registered model {name!r} has the alias {alias!r} at {client.tracking_uri} "
            f"(training registers each new model as {alias!r} when logger.registered_model_name is set)"
        )
    return version


def aliased_or_none(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise RegistryError(f"cannot read the registry at {client.tracking_uri}: {first_line(error)}") from error


def version_holding(client: MlflowClient, name: str, onnx_path: Path) -> str | None:
    """The version of `name` registered from a byte-identical ONNX file (by its sha256 tag), if any."""
    digest = file_sha256(onnx_path)
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as error:
        raise RegistryError(f"cannot read the registry at {client.tracking_uri}: {first_line(error)}") from error
    return next((str(v.version) for v in versions if v.tags.get(ONNX_SHA256_TAG) == digest), None)


def tag_version(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def stamped(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """A decision's tags: `prefix.<key>`, plus who made it and when."""
    stamp = {**values, "by": _user(), "at": datetime.now(UTC).isoformat(timespec="seconds")}
    return {f"{prefix}.{key}": str(value) for key, value in stamp.items()}


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        return "unknown"
