"""Learning-rate schedules with one signature, `(optimizer, total_steps, ...)`, stepped every batch."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _check(total_steps: int, peak_fraction: float) -> int:
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, not {total_steps}")
    if not 0.0 <= peak_fraction < 1.0:
        raise ValueError(f"peak_fraction must be in [0, 1), not {peak_fraction}")
    return max(1, round(total_steps * peak_fraction))


def triangle(
    optimizer: Optimizer, total_steps: int, peak_fraction: float = 0.2, start: float = 0.1, end: float = 0.0
) -> LambdaLR:
    """Linear warm-up from `start` x lr to lr at `peak_fraction` of training, then linear decay to `end` x lr."""
    peak = _check(total_steps, peak_fraction)

    def factor(step: int) -> float:
        if step < peak:
            return start + (1.0 - start) * step / peak
        return end + (1.0 - end) * max(0.0, (total_steps - step) / max(1, total_steps - peak))

    return LambdaLR(optimizer, factor)


def cosine(
    optimizer: Optimizer, total_steps: int, peak_fraction: float = 0.05, start: float = 0.0, end: float = 0.0
) -> LambdaLR:
    """Linear warm-up to lr, then half a cosine down to `end` x lr."""
    peak = _check(total_steps, peak_fraction)

    def factor(step: int) -> float:
        if step < peak:
            return start + (1.0 - start) * step / peak
        progress = min(1.0, (step - peak) / max(1, total_steps - peak))
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
