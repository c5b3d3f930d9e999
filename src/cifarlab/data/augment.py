"""Batched augmentation on uint8 NHWC image tensors, on whatever device they live on.

Crop-with-padding and horizontal flip are one gather: every output pixel reads a source pixel whose row and
column index are shifted (and mirrored) per image, with reflect padding folded into the index arithmetic, so
no padded copy of the batch is ever materialised and no Python loop runs per image.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


def _reflect(index: Tensor, size: int) -> Tensor:
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def translate_and_flip(images: Tensor, shift_y: Tensor, shift_x: Tensor, flip: Tensor) -> Tensor:
    """Shift each image by (shift_y, shift_x) pixels with reflect padding, then mirror it where `flip` is set."""
    batch, height, width, _ = images.shape
    rows = _reflect(torch.arange(height, device=images.device) + shift_y[:, None], height)
    cols = torch.arange(width, device=images.device).expand(batch, width)
    cols = torch.where(flip[:, None], width - 1 - cols, cols)
    cols = _reflect(cols + shift_x[:, None], width)
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    return images[batch_index, rows[:, :, None], cols[:, None, :]]


def cutout(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Zero one random size x size square per image (it may overlap the border)."""
    batch, height, width, _ = images.shape
    device = images.device
    top = torch.randint(-(size // 2), height - size // 2, (batch, 1, 1), device=device, generator=generator)
    left = torch.randint(-(size // 2), width - size // 2, (batch, 1, 1), device=device, generator=generator)
    ys = torch.arange(height, device=device)[None, :, None]
    xs = torch.arange(width, device=device)[None, None, :]
    inside = (ys >= top) & (ys < top + size) & (xs >= left) & (xs < left + size)
    return images.masked_fill(inside[..., None], 0)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation. `flip` is "random", "alternate" (each image flipped on every other epoch,
    starting from a random parity per image, as airbench does) or "none"."""

    translate: int = 2
    flip: str = "random"
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.flip not in ("random", "alternate", "none"):
            raise ValueError(f"flip must be 'random', 'alternate' or 'none', not {self.flip!r}")

    def __call__(
        self, images: Tensor, indices: Tensor, epoch: int, flip_parity: Tensor, generator: torch.Generator
    ) -> Tensor:
        """Augment a batch; `indices` are the images' dataset positions, `flip_parity` a 0/1 per dataset image."""
        batch, device = len(images), images.device
        shift = self.translate
        shift_y = torch.randint(-shift, shift + 1, (batch,), device=device, generator=generator)
        shift_x = torch.randint(-shift, shift + 1, (batch,), device=device, generator=generator)
        if self.flip == "random":
            flip = torch.rand(batch, device=device, generator=generator) < 0.5
        elif self.flip == "alternate":
            flip = (flip_parity[indices] + epoch) % 2 == 1
        else:
            flip = torch.zeros(batch, dtype=torch.bool, device=device)
        images = translate_and_flip(images, shift_y, shift_x, flip)
        if self.cutout:
            images = cutout(images, self.cutout, generator)
        return images
