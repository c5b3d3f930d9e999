"""What a training run prints: every message once, one line per epoch, and no third-party noise a user cannot act on.

The noise is dropped where it is made, each by its exact message, never by muting a logger or a warning category:
a new message from the same places still shows.
"""

import logging
import time
import warnings

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

# Log records that narrate or advertise, by (logger, start of the message).
DROPPED_RECORDS = (
    # Lightning advertises its cloud logger in every run that has another logger
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
    # the ONNX exporter lists torchvision's operators it cannot register: four lines per export; torchvision is not used
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
    # gcsfs (DVC's GCS remote) announces a default feature on import
    ("gcsfs", "gcsfs experimental features enabled"),
)
# Python warnings, by (category, regex matched at the start of the message).
IGNORED_WARNINGS = (
    # Lightning 2.6 and torch's ONNX exporter call an API torch 2.13 deprecates: nothing to change on this side
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # metrics are logged per epoch only (no step metrics), so an epoch shorter than the interval loses nothing
    (UserWarning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
    # SLURM jobs go through hydra/launcher=slurm (submitit runs srun itself); a plain `python train.py` on a machine
    # that has srun is a local run, not a mistake
    (UserWarning, r"The `srun` command is available on your system but is not used"),
)
# Loggers Lightning gives a console handler of their own at import; under Hydra the root logger prints them already.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_console() -> None:
    """Print each message once and drop the known noise (idempotent: a sweep's jobs call it in one process)."""
    if logging.getLogger().hasHandlers():
        # Lightning's own handler printed each message, and the root logger's (Hydra's console and file) again
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    for name, prefix in DROPPED_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
    for category, message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class EpochLog(Callback):
    """One line per epoch, the same on a terminal and in a file (no progress bar redraws):
    `epoch  3/20  train loss 1.2345 acc 55.1%  val acc 60.2%  6.1 s`. Keeps the training phase's wall and CPU
    seconds (`train_seconds`, `train_cpu_seconds`) for the run's record."""

    train_seconds: float | None = None
    train_cpu_seconds: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            network = getattr(pl_module, "net", pl_module)
            network = getattr(network, "backbone", network)
            parameters = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            log.info(
                "Training %s (%s trainable parameters) on %s: epochs %d to %d, %d batches each",
                type(network).__name__,
                f"{parameters:,}",
                pl_module.device.type,
                trainer.current_epoch + 1,
                trainer.max_epochs,
                trainer.num_training_batches,
            )
        self._fit_start = time.perf_counter(), time.process_time()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        width = len(str(trainer.max_epochs))
        parts = [f"epoch {trainer.current_epoch + 1:>{width}}/{trainer.max_epochs}"]
        if "train/loss" in metrics:
            parts.append(f"train loss {float(metrics['train/loss']):.4f} acc {100 * float(metrics['train/acc']):.1f}%")
        if "val/acc" in metrics:
            parts.append(f"val acc {100 * float(metrics['val/acc']):.1f}%")
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        log.info("  ".join(parts))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.train_seconds = time.perf_counter() - self._fit_start[0]
            # CPU seconds of every thread of this process: what a busy machine stretches least
            self.train_cpu_seconds = time.process_time() - self._fit_start[1]
            log.info(
                "Trained %d epochs in %.1f s (%.0f CPU s)",
                trainer.current_epoch,
                self.train_seconds,
                self.train_cpu_seconds,
            )
