"""The body of `train.py`: data, model, trainer, fit, test, export and tracking, from one composed config."""

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, cast

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from cifarlab import slurm, tracking
from cifarlab.callbacks.onnx_export import OnnxExport
from cifarlab.console import EpochLog, quiet_console
from cifarlab.data.datamodule import CIFAR10DataModule
from cifarlab.errors import ConfigError
from cifarlab.export.onnx import read_metadata
from cifarlab.metrics import confusion_figure
from cifarlab.mlflow_ui import runs_url
from cifarlab.runtime import check_accelerator
from cifarlab_contract.files import write_atomic
from cifarlab_lifecycle.publish import publish_model

log = logging.getLogger(__name__)

RUN_ID_ENV = "CIFARLAB_RUN_ID"  # hands rank 0's run id to the DDP processes Lightning launches
MLFLOW_LOGGER_TARGET = "cifarlab.tracking.mlflow_logger"


def train(cfg: DictConfig) -> float | None:
    """Train, test and export one model; return the value of `cfg.optimized_metric` for sweepers."""
    check_accelerator(cfg.trainer.accelerator)
    quiet_console()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt_path = _existing_checkpoint(cfg.get("ckpt_path"))
    datamodule: CIFAR10DataModule = instantiate(cfg.data)
    if _rank() == 0:
        datamodule.load()  # data problems surface before anything is created, and the manifest is known

    logger = _open_run(cfg, ckpt_path)
    run_dir = Path(cfg.paths.output_dir)
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        log.info("Run %s in %s, config:\n%s", cfg.run_id, run_dir, config_yaml)
        write_atomic(run_dir / "config.yaml", config_yaml)

    model: L.LightningModule = instantiate(
        cfg.model, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"), _recursive_=False
    )
    epoch_log = EpochLog()
    callbacks = [epoch_log, *(instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=[logger] if logger else False)

    mlflow = tracking.find_mlflow_logger(trainer.loggers)
    if mlflow is not None and _rank() == 0:
        params = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))  # a DictConfig: str keys
        tracking.log_run_start(mlflow, params, _run_tags(cfg, datamodule))
        tracking.log_dataset(mlflow, datamodule.load())

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    if mlflow is not None and trainer.is_global_zero and epoch_log.train_seconds is not None:
        tracking.log_train_time(mlflow, epoch_log.train_seconds, epoch_log.train_cpu_seconds)

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)  # _report_test says it
        metrics.update({name: float(value) for name, value in trainer.callback_metrics.items()})
        if trainer.is_global_zero:
            _report_test(run_dir, model, len(datamodule.load().test.labels), mlflow)
            _write_test_report(run_dir, model)

    onnx = next((c.path for c in callbacks if isinstance(c, OnnxExport)), None)
    version = None
    if mlflow is not None and trainer.is_global_zero:
        version = tracking.log_run_end(mlflow, run_dir, onnx, best or None)
        log.info("Runs in MLflow: %s", runs_url(mlflow._tracking_uri, mlflow.experiment_id or ""))
    if cfg.get("publish_dir") and trainer.is_global_zero:
        _publish(cfg, best, onnx, model, version)
    return _optimized_metric(cfg, metrics)


def _rank() -> int:
    """This process's rank in a distributed run, or at least whether it is 0, before the Trainer exists. Lightning
    reads RANK, LOCAL_RANK or SLURM_PROCID into rank_zero_only (untyped) at import; a node started by hand with the
    rendezvous variables (NODE_RANK=1, no RANK) reads as 0 there until fit, so its node rank stands in."""
    rank = int(getattr(rank_zero_only, "rank", 0))
    return rank or int(os.environ.get("NODE_RANK", "0"))


def _publish(cfg: DictConfig, best: str, onnx: Path | None, model: Any, version: str | None) -> None:
    if not best or onnx is None or not onnx.exists():
        raise ConfigError(
            "publish_dir needs a best checkpoint and its ONNX export (callbacks=default, no fast_dev_run)"
        )
    params = tracking.flatten(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)))  # a DictConfig: str keys
    metadata = read_metadata(onnx)
    written = publish_model(Path(cfg.publish_dir), Path(best), onnx, metadata, params, model.test_report, version)
    log.info("Published %s", ", ".join(map(str, written)))


def _existing_checkpoint(path: str | None) -> str | None:
    if path and not Path(path).is_file():
        raise ConfigError(
            f"checkpoint not found: {path} (ckpt_path must name a .ckpt file, e.g. runs/<run id>/checkpoints/last.ckpt)"
        )
    return path


def _open_run(cfg: DictConfig, ckpt_path: str | None) -> Logger | None:
    """Decide the run id (MLflow's when it tracks, a fresh one otherwise, the old one when resuming), name the
    output folder after it, and instantiate the logger."""
    run_id = _resumed_run(ckpt_path)
    if _rank() != 0:
        run_id = run_id or os.environ.get(RUN_ID_ENV)
    logger_cfg = cfg.get("logger")
    logger = None
    if logger_cfg and logger_cfg.get("_target_") == MLFLOW_LOGGER_TARGET:
        logger = instantiate(logger_cfg, run_id=run_id, run_name=_run_name(cfg))
        run_id = logger.run_id if _rank() == 0 else run_id
    run_id = run_id or uuid.uuid4().hex
    os.environ[RUN_ID_ENV] = run_id
    with open_dict(cfg):
        cfg.run_id = run_id
        cfg.paths.output_dir = str(Path(cfg.paths.runs_dir) / run_id)
    if logger_cfg and logger is None:
        logger = instantiate(logger_cfg)
    return logger


def _resumed_run(ckpt_path: str | None) -> str | None:
    """A checkpoint inside runs/<run id>/checkpoints/ continues that run (same id, folder and MLflow run)."""
    if not ckpt_path:
        return None
    run_dir = Path(ckpt_path).resolve().parent.parent
    return run_dir.name if (run_dir / "config.yaml").is_file() else None


def _run_name(cfg: DictConfig) -> str:
    if cfg.get("run_name"):
        return cfg.run_name
    overrides = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return overrides or cfg.model.net._target_.rsplit(".", 1)[-1]


def _run_tags(cfg: DictConfig, datamodule: Any) -> dict[str, str]:
    tags = {
        "data.manifest_sha256": datamodule.dataset.manifest_sha256,
        "data.source": str(datamodule.dataset.manifest.get("source", {})),
        "output_dir": cfg.paths.output_dir,
        **tracking.git_state(cfg.paths.root_dir),
        **tracking.system_info(cfg.trainer.accelerator),
        **slurm.job_tags(),
    }
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra_cfg = HydraConfig.get()
        tags.update({"sweep.id": Path(hydra_cfg.sweep.dir).name, "sweep.job": str(hydra_cfg.job.num)})
    return tags


def _report_test(run_dir: Path, model: Any, split_size: int, mlflow: Any) -> None:
    """Say what the test metrics cover: all of the test split, or a subset (trainer.limit_test_batches) of which
    size; the same words go to the run's `test.images` tag."""
    report = model.test_report
    images = int(report["images"])
    coverage = f"all {images:,}" if images == split_size else f"a subset, {images:,} of the {split_size:,}"
    where = run_dir / "test_metrics.json"
    log.info(
        "Test accuracy %.2f%%, macro F1 %.4f, loss %.4f on %s test images (%s)",
        100 * report["acc"],
        report["f1_macro"],
        report["loss"],
        coverage,
        where,
    )
    if mlflow is not None:
        mlflow.experiment.set_tag(mlflow.run_id, "test.images", f"{coverage} test images")


def _write_test_report(run_dir: Path, model: Any) -> None:
    write_atomic(run_dir / "test_metrics.json", json.dumps(model.test_report, indent=2, sort_keys=True))
    if model.test_confusion is not None:
        figure = confusion_figure(model.test_confusion, model.class_names)
        figure.savefig(run_dir / "confusion_matrix.png", dpi=100)


def _optimized_metric(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise ConfigError(f"optimized_metric {name!r} was not logged; logged metrics: {', '.join(sorted(metrics))}")
    return metrics[name]
