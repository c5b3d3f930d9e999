"""An airbench-style fast network (after Keller Jordan's airbench).

A frozen first layer whitens 2x2 patches with the eigenvectors of the training data's patch covariance, then
three conv groups (conv, max-pool, BN, GELU, conv, BN, GELU) without residuals, a global max-pool and a
scaled linear head. The whitening layer starts at zero and must be fitted with `fit_whitening` on training
images before training: the LightningModule does so at fit start.
"""

import torch
from torch import Tensor, nn


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding="same", bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _batch_norm(out_channels, bn_momentum)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding="same", bias=False)
        self.norm2 = _batch_norm(out_channels, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


def _batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    # The scale is frozen at 1 (only the shift learns): fewer parameters to tune and it trains faster here.
    norm = nn.BatchNorm2d(channels, momentum=momentum, eps=1e-12)
    norm.weight.requires_grad_(False)
    return norm


class AirbenchNet(nn.Module):
    whitening_fitted: Tensor  # a buffer: saved with the weights, so a loaded model is not refitted

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (64, 256, 256),
        whiten_kernel: int = 2,
        whiten_width: int = 24,
        bn_momentum: float = 0.4,
        logit_scale: float = 1 / 9,
    ) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.register_buffer("whitening_fitted", torch.tensor(False))
        self.act = nn.GELU()
        groups, in_channels = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(in_channels, width, bn_momentum))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(in_channels, num_classes, bias=False)
        self.logit_scale = logit_scale
        for group in groups:
            for conv in (group.conv1, group.conv2):
                # Identity on the first in_channels filters: each group starts close to passing its input on.
                nn.init.dirac_(conv.weight.data[: conv.in_channels])

    @torch.no_grad()
    def fit_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images [N, 3, H, W] (a few thousand suffice)."""
        kernel = self.whiten.kernel_size[0]
        channels = images.shape[1]
        # On the CPU in float64, whatever the training device: the sum over millions of patches wants float64,
        # which MPS lacks, and MPS has no eigh. 5,000 images take 1.4-2 s on a busy 2-core CPU.
        patches = images.detach().float().cpu().double().unfold(2, kernel, 1).unfold(3, kernel, 1)  # N,C,H',W',k,k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * kernel * kernel)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        # Strongest directions first, each scaled to unit variance; the negated copies let GELU pass both signs.
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0)
        filters = filters.reshape(-1, channels, kernel, kernel)
        half = self.whiten.out_channels // 2
        weight = torch.cat([filters[:half], -filters[:half]]).to(self.whiten.weight.dtype)
        self.whiten.weight.copy_(weight.to(self.whiten.weight))  # cast on the CPU above, only moved here
        self.whitening_fitted.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.groups(self.act(self.whiten(x)))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale
