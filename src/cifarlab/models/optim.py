"""Muon: momentum SGD whose step for each filter bank is orthogonalised by a Newton–Schulz iteration.

After Keller Jordan's Muon, which set airbench94's speed record. The (Nesterov) momentum of a conv filter bank,
flattened to a matrix [out, in * k * k], is replaced by the nearest semi-orthogonal matrix (every singular
value close to 1): the step then moves every direction of the filter bank by the same amount instead of the
few directions that dominate the gradient. Groups with `orthogonalize=False` (biases, the classifier head)
and any 1-D parameter take plain momentum SGD steps, with torch.optim.SGD's update rule.
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

# Quintic iteration x <- a x + b (x x^T) x + c (x x^T)^2 x, tuned to pull singular values in (0, 1] up to about
# 1 in a handful of steps (it trades exact convergence for speed: they end in roughly [0.7, 1.2]).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(matrix: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T for the SVD U S V^T of a 2-D matrix (bfloat16 arithmetic on CUDA, float32 elsewhere)."""
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz takes a matrix, not a tensor of shape {tuple(matrix.shape)}")
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class Muon(Optimizer):
    """Per group: `lr`, `momentum`, `nesterov`, `weight_decay` (L2 added to the gradient, as torch.optim.SGD does),
    `orthogonalize` (Newton–Schulz steps for parameters of 2 or more dimensions), `ns_steps`, and
    `normalize_weights` (rescale each filter bank to Frobenius norm sqrt(out channels) before its step; with
    BatchNorm after every conv the scale carries no information, and fixing it keeps the effective step size
    constant, as airbench94's Muon does)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        orthogonalize: bool = True,
        ns_steps: int = 5,
        normalize_weights: bool = False,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError(
                f"Muon needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0 and ns_steps >= 1, not lr={lr}, "
                f"momentum={momentum}, weight_decay={weight_decay}, ns_steps={ns_steps}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "orthogonalize": orthogonalize,
            "ns_steps": ns_steps,
            "normalize_weights": normalize_weights,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: Tensor, group: dict[str, Any]) -> None:
        grad = param.grad
        assert grad is not None  # step() updates only parameters that have one
        if group["weight_decay"]:
            grad = grad.add(param, alpha=group["weight_decay"])
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = grad.clone()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
        buffer = state["momentum_buffer"]
        step = grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
        if group["orthogonalize"] and param.ndim >= 2:
            if group["normalize_weights"]:
                param.mul_(len(param) ** 0.5 / param.norm())
            step = newton_schulz(step.reshape(len(step), -1), group["ns_steps"]).view_as(param)
        param.add_(step, alpha=-group["lr"])
