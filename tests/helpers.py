"""Test-only pieces that runs load through config overrides (`+callbacks.x._target_=tests.helpers.X`)."""

import json
import os
import time
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode


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
        where = {
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "host": os.environ.get("SLURMD_NODENAME"),
        }
        record = {"state": state, "steps": trainer.global_step, **where}
        torch.save(record, self.dirpath / f"rank{trainer.global_rank}.pt")


class HostSyncGuard(Callback):
    """Record every tensor-to-host conversion (.item(), bool(), float(), .tolist(), .cpu(), .numpy()) made during
    training, Lightning's own work included; on a GPU each one stalls the CPU until the device catches up.

    What runs from one batch's start to the next one's (forward, backward, optimizer, scheduler, hooks, logging)
    goes to `per_step`; what runs from an epoch's last batch to its validation or end goes to `epoch_end`, where
    a sync per epoch is harmless. Writes {"per_step": [...], "epoch_end": [...], "steps": n} to `path` at fit end.
    """

    # conversions to Python values, and ops whose output size depends on the data
    SYNCING: ClassVar[set[str]] = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"}
    SYNCING |= {"unique", "_unique", "_unique2", "unique_consecutive", "nonzero", "masked_select"}

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.per_step: list[str] = []
        self.epoch_end: list[str] = []
        self.steps = 0
        self._pending: list[str] = []
        self._mode: TorchFunctionMode | None = None

    def on_train_batch_start(self, *args: object) -> None:
        if self._mode is None:
            self._mode = _Recorder(self._pending, self.SYNCING)
            self._mode.__enter__()
        else:  # a whole step cycle has run since the previous batch started
            self.per_step += self._pending
            self._pending.clear()

    def on_train_batch_end(self, *args: object) -> None:
        self.steps += 1

    def _end_of_epoch(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
            self.epoch_end += self._pending
            self._pending.clear()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_of_epoch()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_of_epoch()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = {"per_step": self.per_step, "epoch_end": self.epoch_end, "steps": self.steps}
        self.path.write_text(json.dumps(report))


class _Recorder(TorchFunctionMode):
    def __init__(self, calls: list[str], names: set[str]) -> None:
        super().__init__()
        self.calls, self.names = calls, names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.names:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


class Stall(Callback):
    """Sleep at fit start, its MLflow run open: a job that is still running when the test kills it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        time.sleep(self.seconds)
