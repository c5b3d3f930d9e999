"""Test-only pieces that runs load through config overrides (`+callbacks.x._target_=tests.helpers.X`)."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class CrashAfterEpoch(Callback):
    """Raise as the epoch after `epoch` starts, its checkpoints written: a run killed mid-training."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch + 1:
            raise RuntimeError(f"simulated crash after epoch {self.epoch}")


class DumpWeights(Callback):
    """Every rank saves its final weights, so a test can compare the ranks of a DDP run."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "steps": trainer.global_step}, self.dirpath / f"rank{trainer.global_rank}.pt")
