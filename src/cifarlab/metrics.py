"""Classification metrics shared by training's test phase and the evaluation of exported models."""

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files

import matplotlib.pyplot as plt
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def classification_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average=None),
            "recall": MulticlassRecall(num_classes, average=None),
            "f1": MulticlassF1Score(num_classes, average=None),
            "confusion": MulticlassConfusionMatrix(num_classes),
        }
    )


def summarize(computed: dict[str, Tensor], class_names: Sequence[str]) -> dict[str, float]:
    """Flatten computed metrics to scalars: acc, macro precision/recall/F1 and per-class values."""
    summary = {"acc": float(computed["acc"])}
    for name in ("precision", "recall", "f1"):
        per_class = computed[name]
        summary[f"{name}_macro"] = float(per_class.mean())
        summary.update({f"{name}/{cls}": float(value) for cls, value in zip(class_names, per_class, strict=True)})
    return summary


def confusion_figure(confusion: Tensor, class_names: Sequence[str]) -> plt.Figure:
    """Row-normalised confusion matrix (rows: true class) with counts written in each cell."""
    counts = confusion.cpu().to(torch.int64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    figure, axes = plt.subplots(figsize=(8, 7))
    axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in ticks:
        for col in ticks:
            color = "white" if rates[row, col] > 0.5 else "black"
            axes.text(col, row, str(int(counts[row, col])), ha="center", va="center", fontsize=7, color=color)
    figure.tight_layout()
    return figure
