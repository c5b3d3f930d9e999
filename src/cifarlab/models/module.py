"""The LightningModule: one classifier network, configured optimizer and schedule, torchmetrics reporting.

Hyper-parameters are plain config dicts (network, optimizer, scheduler), saved in every checkpoint, so
`ImageClassifier.load_from_checkpoint(path)` rebuilds the exact model without the run's config files.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifarlab.data.prepare import CIFAR10_CLASSES
from cifarlab.errors import ConfigError
from cifarlab.metrics import classification_metrics, summarize

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@runtime_checkable
class FitsWhitening(Protocol):
    """A network whose first layer is fitted to training images before training (airbench's whitening)."""

    whitening_fitted: Tensor

    def fit_whitening(self, images: Tensor) -> None: ...


class ClassifierNet(nn.Module):
    """uint8 images [N, H, W, 3] in, logits [N, classes] out: exactly the function exported to ONNX.

    The cast, scaling, channel transpose and normalisation live here, so training, evaluation and the
    exported graph share one preprocessing. Permuting NHWC to NCHW yields a channels_last tensor for free.
    """

    mean: Tensor  # buffers, shaped [1, 3, 1, 1]
    std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        flip_tta: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)
        self.flip_tta = flip_tta

    def preprocess(self, images: Tensor) -> Tensor:
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images)
        logits = self.backbone(x)
        if self.flip_tta and not self.training:
            logits = (logits + self.backbone(x.flip(-1))) / 2
        return logits


def _build(group: str, config: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Instantiate an optimizer or scheduler; arguments it rejects are a config error, named as such."""
    try:
        return instantiate(config, _partial_=True)(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{group} {config['_target_']} rejects its configuration: {error}") from error


def _plain(value: Any) -> Any:
    # Plain containers keep checkpoints loadable with torch.load(weights_only=True).
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


class ImageClassifier(L.LightningModule):
    def __init__(
        self,
        net: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        class_names: Sequence[str] = CIFAR10_CLASSES,
        label_smoothing: float = 0.0,
        norm_bias_lr_scale: float = 1.0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        flip_tta: bool = False,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        arguments = {name: _plain(value) for name, value in locals().items() if name[0] != "_" and name != "self"}
        self.save_hyperparameters(arguments, logger=False)  # the run logs the whole composed config instead
        self.class_names = tuple(class_names)
        num_classes = len(self.class_names)
        self.net = ClassifierNet(instantiate(self.hparams["net"], num_classes=num_classes), mean, std, flip_tta)
        if channels_last:
            # torch's type stubs omit Module.to's memory_format keyword, which it accepts and documents
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if compile:
            self.net.compile()
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.test_metrics = classification_metrics(num_classes)
        self.test_report: dict[str, float] = {}
        self.test_confusion: Tensor | None = None

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def on_fit_start(self) -> None:
        backbone = self.net.backbone
        if isinstance(backbone, FitsWhitening) and not bool(backbone.whitening_fitted):
            datamodule = getattr(self.trainer, "datamodule", None)  # set by Lightning at fit time, not declared
            if datamodule is None or not hasattr(datamodule, "train_images"):
                raise RuntimeError("this network fits its first layer on training images: train it with a datamodule")
            backbone.fit_whitening(self.net.preprocess(datamodule.train_images[:5000]))

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # the sanity check's validation must not count as a best

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams["label_smoothing"])
        # Metric objects accumulate on the device and are reduced once per epoch: no host sync per step.
        self.train_loss(loss.detach())
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.net(images)
        self.val_loss(F.cross_entropy(logits, labels))
        self.val_acc(logits, labels)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.net(images)
        self.test_loss(F.cross_entropy(logits, labels))
        self.test_metrics.update(logits, labels)

    def on_test_epoch_end(self) -> None:
        computed = self.test_metrics.compute()
        self.test_report = {"loss": float(self.test_loss.compute()), **summarize(computed, self.class_names)}
        self.test_confusion = computed["confusion"].cpu()
        # Headline numbers go through Lightning (progress table, callback_metrics); per-class ones only to loggers.
        headline = {f"test/{name}": value for name, value in self.test_report.items() if "/" not in name}
        self.log_dict(headline, sync_dist=True)
        per_class = {f"test/{name}": value for name, value in self.test_report.items() if "/" in name}
        for logger in self.loggers:
            logger.log_metrics(per_class, step=self.global_step)
        self.test_metrics.reset()
        self.test_loss.reset()

    def configure_optimizers(self) -> OptimizerLRScheduler:
        # Partial first, call second: Hydra would otherwise try to turn the tensors into config nodes.
        optimizer = _build("optimizer", self.hparams["optimizer"], self._param_groups())
        if self.hparams["scheduler"] is None:
            return {"optimizer": optimizer}
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = _build("scheduler", self.hparams["scheduler"], optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _param_groups(self) -> list[dict[str, Any]]:
        """Normalisation biases may learn at a scaled rate with weight decay scaled inversely, so their
        effective decay per step stays that of every other parameter (airbench's decoupled rates)."""
        scale = self.hparams["norm_bias_lr_scale"]
        norm_biases = [
            module.bias
            for module in self.net.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.bias is not None
        ]
        norm_ids = {id(p) for p in norm_biases}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in norm_ids]
        if scale == 1.0:
            return [{"params": others + norm_biases}]
        lr = self.hparams["optimizer"]["lr"]
        weight_decay = self.hparams["optimizer"].get("weight_decay", 0.0)
        return [
            {"params": others},
            {"params": norm_biases, "lr": lr * scale, "weight_decay": weight_decay / scale},
        ]
