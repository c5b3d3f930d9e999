"""The body of `eval.py`: test-set metrics of a checkpoint or of an exported ONNX model, one code path for both."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cifarlab.errors import ConfigError, DataError
from cifarlab.export.onnx import onnx_logits, onnx_session, read_metadata
from cifarlab.metrics import classification_metrics, confusion_figure, summarize
from cifarlab.models.module import ImageClassifier
from cifarlab_contract.files import write_atomic
from cifarlab_contract.model import ContractError, metadata_classes

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate `cfg.ckpt_path` or `cfg.onnx_path` on the prepared test split; write and return the metrics."""
    model_path = _model_path(cfg)
    dataset = instantiate(cfg.data).load()
    images, labels = dataset.test.images, dataset.test.labels
    if model_path.suffix == ".onnx":
        classes = _onnx_classes(model_path)
        logits = onnx_logits(onnx_session(model_path), images, cfg.batch_size)
    else:
        module = ImageClassifier.load_from_checkpoint(model_path, map_location="cpu")
        classes = module.class_names
        logits = _torch_logits(module, images, cfg.batch_size)
    if tuple(classes) != dataset.classes:
        raise DataError(
            f"{model_path} was trained on classes {list(classes)}, the test data has {list(dataset.classes)}"
        )
    metrics = classification_metrics(len(classes))
    metrics.update(torch.from_numpy(logits), torch.from_numpy(labels))
    computed = metrics.compute()
    summary = summarize(computed, classes)
    summary["images"] = len(labels)
    output = Path(cfg.metrics_path) if cfg.get("metrics_path") else model_path.with_suffix(".test_metrics.json")
    write_atomic(output, json.dumps(summary, indent=2, sort_keys=True))
    if cfg.get("report_dir"):
        write_report(Path(cfg.report_dir), summary, computed["confusion"], classes, labels, logits.argmax(axis=1))
    log.info(
        "%s on %d test images: accuracy %.4f, macro F1 %.4f -> %s",
        model_path,
        len(labels),
        summary["acc"],
        summary["f1_macro"],
        output,
    )
    print(format_report(summary, classes))
    return summary


def write_report(
    folder: Path,
    summary: dict[str, float],
    confusion: torch.Tensor,
    classes: list[str] | tuple[str, ...],
    labels: np.ndarray,
    predictions: np.ndarray,
) -> None:
    """The files `dvc plots show` draws: per-class scores, every (true, predicted) pair, the confusion matrix."""
    support = np.bincount(labels, minlength=len(classes))
    rows = ["class,precision,recall,f1,support"] + [
        f"{name},{summary[f'precision/{name}']:.6f},{summary[f'recall/{name}']:.6f},{summary[f'f1/{name}']:.6f},{n}"
        for name, n in zip(classes, support, strict=True)
    ]
    write_atomic(folder / "per_class.csv", "\n".join(rows) + "\n")
    pairs = ["actual,predicted"] + [f"{classes[a]},{classes[p]}" for a, p in zip(labels, predictions, strict=True)]
    write_atomic(folder / "predictions.csv", "\n".join(pairs) + "\n")
    figure = confusion_figure(confusion, classes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomic(folder / "confusion_matrix.png", buffer.getvalue())


def _model_path(cfg: DictConfig) -> Path:
    given = [path for path in (cfg.get("ckpt_path"), cfg.get("onnx_path")) if path]
    if len(given) != 1:
        raise ConfigError(
            "give exactly one model to evaluate: ckpt_path=runs/<run id>/checkpoints/best.ckpt "
            "or onnx_path=runs/<run id>/model.onnx"
        )
    path = Path(given[0])
    if not path.is_file():
        raise ConfigError(f"model file not found: {path}")
    return path


def _onnx_classes(path: Path) -> tuple[str, ...]:
    try:
        return metadata_classes(read_metadata(path))
    except ContractError as error:
        raise ConfigError(f"{path} has {error}") from error


@torch.no_grad()
def _torch_logits(module: ImageClassifier, images: np.ndarray, batch_size: int) -> np.ndarray:
    net = module.net.eval()
    batches = [net(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(batches).numpy()


def format_report(summary: dict[str, float], classes: list[str] | tuple[str, ...]) -> str:
    lines = [
        f"accuracy {summary['acc']:.4f}   macro precision {summary['precision_macro']:.4f}   "
        f"macro recall {summary['recall_macro']:.4f}   macro F1 {summary['f1_macro']:.4f}",
        f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}",
    ]
    for name in classes:
        lines.append(
            f"{name:<12}{summary[f'precision/{name}']:>10.4f}{summary[f'recall/{name}']:>10.4f}{summary[f'f1/{name}']:>10.4f}"
        )
    return "\n".join(lines)
