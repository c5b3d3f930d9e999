"""A registered version, or an ONNX file, scored on the configured test data by the evaluation configs/registry.yaml
names (eval.py's code path): promotion and retraining compare models by these scores."""

import tempfile
from pathlib import Path
from typing import cast

from hydra.utils import instantiate
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities.model_registry import ModelVersion
from omegaconf import DictConfig, OmegaConf

from cifarlab_lifecycle.registry import ONNX_FILE, RegistryError, first_line


def score_version(cfg: DictConfig, version: ModelVersion) -> float:
    """The version's `cfg.metric` on the configured test data."""
    label = f"{version.name} version {version.version}"
    with tempfile.TemporaryDirectory(prefix="promote-") as folder:
        try:
            # The version's own artifact location, not a models:/ URI: MLflow resolves those against the global
            # registry URI rather than this client's.
            location = MlflowClient(cfg.tracking_uri).get_model_version_download_uri(version.name, version.version)
            model_dir = download_artifacts(artifact_uri=location, dst_path=folder, tracking_uri=cfg.tracking_uri)
        except Exception as error:  # whatever the cause, the decision cannot be made: report it, change nothing
            raise RegistryError(f"could not evaluate {label}, nothing was changed: {first_line(error)}") from error
        return score_onnx(cfg, Path(model_dir) / ONNX_FILE, label)


def score_onnx(cfg: DictConfig, onnx_path: Path, label: str) -> float:
    """`cfg.metric` of an ONNX file on the configured test data."""
    with tempfile.TemporaryDirectory(prefix="score-") as folder:
        eval_cfg = OmegaConf.merge(
            cfg,
            {
                "ckpt_path": None,
                "onnx_path": str(onnx_path),
                "report_dir": None,
                "metrics_path": str(Path(folder) / "test_metrics.json"),
            },
        )
        try:
            summary = instantiate(cfg.registry.scorer)(cast(DictConfig, eval_cfg))
        except Exception as error:  # whatever the cause, the decision cannot be made: report it, change nothing
            raise RegistryError(f"could not evaluate {label}, nothing was changed: {first_line(error)}") from error
    if cfg.metric not in summary:
        raise RegistryError(f"metric {cfg.metric!r} is not reported by evaluation; choose one of {sorted(summary)}")
    return float(summary[cfg.metric])
