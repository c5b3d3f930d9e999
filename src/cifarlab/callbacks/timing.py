"""Wall time of the training phase, the device synchronised at each mark so queued GPU work is counted."""

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from cifarlab_contract.files import write_atomic


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class TrainingClock(Callback):
    """Seconds from the start of fit to the end of training (`train_seconds`) and of each epoch
    (`epoch_seconds`), written as JSON to `path` when training ends (scripts/bench_speed.py reads it).

    The clock starts before the module's own fit-start work (the whitening fit), as the raw loop's clock does;
    a sanity validation, where a recipe makes one, counts against the template."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.epoch_seconds: list[float] = []
        self.train_seconds: float | None = None

    def _now(self, pl_module: L.LightningModule) -> float:
        synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_start = self._now(pl_module)  # callbacks' on_fit_start runs before the module's

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._now(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds.append(self._now(pl_module) - self._epoch_start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_seconds = self._now(pl_module) - self._train_start
        if trainer.is_global_zero:
            report = {"train_seconds": self.train_seconds, "epoch_seconds": self.epoch_seconds}
            write_atomic(self.path, json.dumps(report, indent=2))
