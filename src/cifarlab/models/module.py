"""The LightningModule: one classifier network, configured optimizer and schedule, torchmetrics reporting.

Hyper-parameters are plain config dicts (network, optimizer, scheduler), saved in every checkpoint, so
`ImageClassifier.load_from_checkpoint(path)` rebuilds the exact model without the run's config files.
"""

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cifarlab.errors import ConfigError
from cifarlab.metrics import classification_metrics, summarize
from cifarlab_contract.classes import CIFAR10_CLASSES

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class ClassifierNet(nn.Module):
    """uint8 images [N, H, W, 3] in, logits [N, classes] out: exactly the function exported to ONNX.

    The cast, scaling, channel transpose and normalisation live here, so training, evaluation and the
    exported graph share one preprocessing. Permuting NHWC to NCHW yields a channels_last tensor for free.

    Test-time augmentation is part of this function too, in eval mode only: the exported model, the served
    model and `eval.py` all average the same views, and ONNX parity checks them. `flip_tta` adds the mirror
    image; `translate_tta=t` adds the views shifted by (t, t) and (-t, -t) pixels with reflect padding (each
    mirrored as well under flip_tta), weighted so that the unshifted views count as much as all shifted ones
    together (airbench's TTA level 2). All views go through the backbone as one batch.
    """

    mean: Tensor  # buffers, shaped [1, 3, 1, 1]
    std: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        flip_tta: bool = False,
        translate_tta: int = 0,
    ) -> None:
        super().__init__()
        if translate_tta < 0:
            raise ValueError(f"translate_tta is a shift in pixels, not {translate_tta}")
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255)
        self.flip_tta = flip_tta
        self.translate_tta = translate_tta

    def preprocess(self, images: Tensor) -> Tensor:
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images)
        if self.training or not (self.flip_tta or self.translate_tta):
            return self.backbone(x)
        unshifted = self._with_mirror(x)
        if not self.translate_tta:
            return self._mean_logits(unshifted)
        t = self.translate_tta
        shifted = self._with_mirror(shift(x, t, t)) + self._with_mirror(shift(x, -t, -t))
        return self._mean_logits(unshifted + shifted, split=len(unshifted))

    def _with_mirror(self, x: Tensor) -> list[Tensor]:
        return [x, x.flip(-1)] if self.flip_tta else [x]

    def _mean_logits(self, views: list[Tensor], split: int | None = None) -> Tensor:
        """Mean logits over the views; with `split`, the mean of (mean over views[:split], mean over the rest)."""
        logits = self.backbone(torch.cat(views)).unflatten(0, (len(views), -1))
        if split is None:
            return logits.mean(0)
        return (logits[:split].mean(0) + logits[split:].mean(0)) / 2


def shift(x: Tensor, down: int, right: int) -> Tensor:
    """Move the content of NCHW images `down` rows and `right` columns (negative: up/left), reflect-padded."""
    pad = max(abs(down), abs(right))
    height, width = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    top, left = pad - down, pad - right
    return padded[..., top : top + height, left : left + width]


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
        param_groups: Mapping[str, Mapping[str, Any]] | None = None,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        flip_tta: bool = False,
        translate_tta: int = 0,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        arguments = {name: _plain(value) for name, value in locals().items() if name[0] != "_" and name != "self"}
        self.save_hyperparameters(arguments, logger=False)  # the run logs the whole composed config instead
        self.class_names = tuple(class_names)
        num_classes = len(self.class_names)
        if param_groups and norm_bias_lr_scale != 1.0:
            raise ConfigError("set either model.param_groups or model.norm_bias_lr_scale, not both")
        backbone = instantiate(self.hparams["net"], num_classes=num_classes)
        self.net = ClassifierNet(backbone, mean, std, flip_tta, translate_tta)
        if channels_last:
            # torch's type stubs omit Module.to's memory_format keyword, which it accepts and documents
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if compile:
            self.net.compile()
        # No input checks in the metrics: their NaN and label checks copy a flag to the host on every step.
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(3))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc_best = MaxMetric()
        self.test_metrics = classification_metrics(num_classes)
        self.test_report: dict[str, float] = {}
        self.test_confusion: Tensor | None = None

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def on_fit_start(self) -> None:
        # A network whose first layer is fitted to training images (airbench's whitening) has `fit_whitening`
        # and a `whitening_fitted` buffer. Looked up by name: a runtime-checkable Protocol does not see module
        # buffers from Python 3.12 on (isinstance looks attributes up statically), and so skipped the fit there.
        backbone = self.net.backbone
        fit_whitening = getattr(backbone, "fit_whitening", None)
        if fit_whitening is None or bool(backbone.whitening_fitted):
            return
        datamodule = getattr(self.trainer, "datamodule", None)  # set by Lightning at fit time, not declared
        if datamodule is None or not hasattr(datamodule, "train_images"):
            raise RuntimeError("this network fits its first layer on training images: train it with a datamodule")
        fit_whitening(self.net.preprocess(datamodule.train_images[:5000]))

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # the sanity check's validation must not count as a best

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams["label_smoothing"])
        # Metric objects accumulate on the device and are reduced once per epoch: no host sync per step, and
        # update() rather than a call, which would also compute each batch's own value.
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach(), labels)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.net(images)
        self.val_loss.update(F.cross_entropy(logits, labels))
        self.val_acc.update(logits, labels)
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
        # how many images the metrics cover: fewer than the split under trainer.limit_test_batches
        images = float(computed["confusion"].sum())
        self.test_report = {
            "loss": float(self.test_loss.compute()),
            "images": images,
            **summarize(computed, self.class_names),
        }
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
        optimizer = _build("optimizer", self.hparams["optimizer"], self.param_groups())
        if self.hparams["scheduler"] is None:
            return {"optimizer": optimizer}
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = _build("scheduler", self.hparams["scheduler"], optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters as optimizer groups: per `param_groups` if set, else by norm_bias_lr_scale."""
        if self.hparams["param_groups"]:
            return self._named_groups(self.hparams["param_groups"])
        return self._norm_bias_groups(self.hparams["norm_bias_lr_scale"])

    def _named_groups(self, config: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Each group takes the parameters whose names match one of its `params` glob patterns (the first group
        that matches wins) and its own optimizer options; the rest form group `default` with the optimizer's."""
        remaining = {name: param for name, param in self.named_parameters() if param.requires_grad}
        groups = []
        for group_name, options in config.items():
            patterns = options.get("params") or []
            names = [name for name in remaining if any(fnmatchcase(name, pattern) for pattern in patterns)]
            if not names:
                raise ConfigError(
                    f"model.param_groups.{group_name}: no trainable parameter matches {list(patterns)}; "
                    f"parameters: {', '.join(remaining)}"
                )
            extra = {key: value for key, value in options.items() if key != "params"}
            groups.append({"name": group_name, "params": [remaining.pop(name) for name in names], **extra})
        if remaining:
            groups.append({"name": "default", "params": list(remaining.values())})
        return groups

    def _norm_bias_groups(self, scale: float) -> list[dict[str, Any]]:
        """Normalisation biases may learn at a scaled rate with weight decay scaled inversely, so their
        effective decay per step stays that of every other parameter (airbench's decoupled rates)."""
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
