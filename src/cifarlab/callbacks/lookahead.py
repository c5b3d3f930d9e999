"""Lookahead on an exponential moving average of the weights (airbench94's EMA)."""

from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn


class Lookahead(Callback):
    """Every `every` optimizer steps, move the average towards the weights and restart the weights from it:
    `average += (1 - d) * (weights - average); weights = average`, with `d = decay * (step / total) ** power`.

    Early in training d is about 0 and nothing is averaged; it grows to `decay` at the last step, after which
    the weights are the average itself, so checkpoints, test and export all see the averaged model. Averaged are
    every floating-point tensor of the network: parameters and BatchNorm's running statistics.
    """

    def __init__(self, every: int = 5, decay: float = 0.95**5, power: float = 3.0) -> None:
        if every < 1 or not 0.0 <= decay <= 1.0:
            raise ValueError(f"Lookahead needs every >= 1 and 0 <= decay <= 1, not every={every}, decay={decay}")
        self.every, self.decay, self.power = every, decay, power
        self.average: dict[str, Tensor] | None = None

    def decay_at(self, step: int, total: int) -> float:
        return self.decay * (step / total) ** self.power

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not at fit start: the network's own on_fit_start (the whitening fit) runs after the callbacks' one.
        if self.average is None:
            self.average = {name: tensor.detach().clone() for name, tensor in self._tensors(pl_module).items()}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, total = trainer.global_step, int(trainer.estimated_stepping_batches)
        if step % self.every == 0:
            self.update(pl_module, self.decay_at(step, total))
        if step == total:
            self.update(pl_module, 1.0)

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule, decay: float) -> None:
        assert self.average is not None, "the average starts at on_train_start"
        for name, tensor in self._tensors(pl_module).items():
            average = self.average[name]
            average.lerp_(tensor, 1.0 - decay)
            tensor.copy_(average)

    @staticmethod
    def _tensors(pl_module: L.LightningModule) -> dict[str, Tensor]:
        # state_dict tensors share storage with the parameters and buffers: copying into them updates the model.
        net = cast(nn.Module, pl_module.net)
        return {name: t for name, t in net.state_dict().items() if t.is_floating_point()}

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average = state_dict["average"]
