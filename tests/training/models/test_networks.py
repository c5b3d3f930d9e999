"""The three backbones: parameter counts derived from their architecture, output shapes, and airbench's
fitted whitening layer and identity (dirac) initialisation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.models.airbench import AirbenchNet
from cifarlab.models.baseline import BaselineCNN
from cifarlab.models.resnet import ResNet18

NUM_CLASSES = 10


def count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def conv(in_channels: int, out_channels: int, kernel: int, bias: bool = False) -> int:
    return in_channels * out_channels * kernel * kernel + (out_channels if bias else 0)


def batch_norm(channels: int) -> int:
    return 2 * channels  # weight and bias


def airbench_count(widths=(64, 256, 256), whiten_width=24, whiten_kernel=2, classes=NUM_CLASSES) -> int:
    total = conv(3, whiten_width, whiten_kernel, bias=True)
    in_channels = whiten_width
    for width in widths:
        total += conv(in_channels, width, 3) + batch_norm(width) + conv(width, width, 3) + batch_norm(width)
        in_channels = width
    return total + in_channels * classes  # head without bias


def resnet18_count(width=64, classes=NUM_CLASSES) -> int:
    total = conv(3, width, 3) + batch_norm(width)
    in_channels = width
    for stage, out_channels in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for block in range(2):
            block_in = in_channels if block == 0 else out_channels
            total += conv(block_in, out_channels, 3) + batch_norm(out_channels)
            total += conv(out_channels, out_channels, 3) + batch_norm(out_channels)
            if block == 0 and (stage > 0 or block_in != out_channels):
                total += conv(block_in, out_channels, 1) + batch_norm(out_channels)  # projection shortcut
        in_channels = out_channels
    return total + in_channels * classes + classes


def baseline_count(widths=(32, 64, 128), classes=NUM_CLASSES) -> int:
    total, in_channels = 0, 3
    for width in widths:
        total += conv(in_channels, width, 3) + batch_norm(width) + conv(width, width, 3) + batch_norm(width)
        in_channels = width
    return total + in_channels * classes + classes


# ------------------------------------------------------------------------------------------ parameter counts


def test_resnet18_parameter_count():
    n = count(ResNet18())
    assert n == resnet18_count()
    assert abs(n - 11.17e6) / 11.17e6 < 0.01
    assert count(ResNet18(), trainable_only=True) == n


def test_baseline_parameter_count():
    n = count(BaselineCNN())
    assert n == baseline_count()
    assert 0.25e6 < n < 0.35e6


def test_airbench_parameter_count():
    net = AirbenchNet()
    n = count(net)
    assert n == airbench_count()
    assert abs(n - 1.97e6) / 1.97e6 < 0.01
    # Frozen: the whitening weight and every BatchNorm scale; the whitening bias and BN shifts still learn.
    frozen = 24 * 3 * 2 * 2 + sum(2 * w for w in (64, 256, 256))
    assert count(net, trainable_only=True) == n - frozen


def test_parameter_counts_follow_the_configuration():
    assert count(AirbenchNet(num_classes=3, widths=(8, 16, 32))) == airbench_count((8, 16, 32), classes=3)
    assert count(ResNet18(num_classes=5, width=8)) == resnet18_count(8, classes=5)
    assert count(BaselineCNN(num_classes=7, widths=(4, 8, 16))) == baseline_count((4, 8, 16), classes=7)


# --------------------------------------------------------------------------------------------- output shapes


@pytest.mark.parametrize(
    "make_net",
    [
        pytest.param(lambda classes: AirbenchNet(num_classes=classes), id="airbench"),
        pytest.param(lambda classes: ResNet18(num_classes=classes), id="resnet18"),
        pytest.param(lambda classes: BaselineCNN(num_classes=classes), id="baseline"),
    ],
)
@pytest.mark.parametrize("classes", [NUM_CLASSES, 3])
def test_output_shape(make_net, classes):
    torch.manual_seed(0)
    net = make_net(classes).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------- airbench whitening


def correlated_images(count: int = 48, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Zero-mean images whose channels and neighbouring pixels are correlated, like natural images."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 3, size + 1, size + 1, generator=generator)
    smooth = noise[..., 1:, 1:] + 0.7 * noise[..., :-1, 1:] + 0.5 * noise[..., 1:, :-1]
    mixing = torch.tensor([[1.0, 0.6, 0.3], [0.0, 1.0, 0.5], [0.0, 0.0, 0.8]])
    return torch.einsum("dc,nchw->ndhw", mixing, smooth)


def patch_moments(outputs: torch.Tensor) -> torch.Tensor:
    """Second moment E[o o^T] over all positions of a conv output [N, C, H, W] (no bias: means are ~0)."""
    flat = outputs.permute(0, 2, 3, 1).reshape(-1, outputs.shape[1]).double()
    return flat.T @ flat / len(flat)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    net = AirbenchNet()
    images = correlated_images()
    bias_before = net.whiten.bias.detach().clone()
    assert not bool(net.whitening_fitted)
    net.fit_whitening(images)
    return net, images, bias_before


def test_fit_whitening_whitens_the_patches(fitted):
    net, images, _ = fitted
    raw = patch_moments(F.unfold(images, 2).view(len(images), 12, 11, 11))
    assert (raw - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5  # the data is far from white
    half = net.whiten.out_channels // 2
    assert half == 12  # one filter per direction of a 3 x 2 x 2 patch
    whitened = patch_moments(F.conv2d(images, net.whiten.weight[:half]))
    torch.testing.assert_close(whitened, torch.eye(half, dtype=torch.float64), atol=0.02, rtol=0)


def test_fit_whitening_orders_filters_by_strength(fitted):
    net, _, _ = fitted
    # Each filter is an eigenvector scaled by 1/sqrt(eigenvalue + eps): strongest first means smallest norm first.
    norms = net.whiten.weight[:12].flatten(1).norm(dim=1)
    assert (norms[1:] >= norms[:-1] * (1 - 1e-5)).all()


def test_fit_whitening_second_half_negates_the_first(fitted):
    net, _, _ = fitted
    weight = net.whiten.weight
    assert weight.shape == (24, 3, 2, 2)
    torch.testing.assert_close(weight[12:], -weight[:12], rtol=0, atol=0)


def test_fit_whitening_state(fitted):
    net, _, bias_before = fitted
    assert bool(net.whitening_fitted)
    assert net.whitening_fitted.dtype == torch.bool
    assert "whitening_fitted" in net.state_dict()
    assert not net.whiten.weight.requires_grad
    assert net.whiten.bias.requires_grad
    torch.testing.assert_close(net.whiten.bias, bias_before, rtol=0, atol=0)


def test_whitening_starts_unfitted_and_frozen():
    net = AirbenchNet()
    assert not bool(net.whitening_fitted)
    assert not net.whiten.weight.requires_grad
    assert all(not group.norm1.weight.requires_grad and not group.norm2.weight.requires_grad for group in net.groups)
    assert all(group.norm1.bias.requires_grad and group.norm2.bias.requires_grad for group in net.groups)


def test_dirac_init_makes_the_first_filters_identity_kernels():
    torch.manual_seed(0)
    net = AirbenchNet()
    for group in net.groups:
        for layer in (group.conv1, group.conv2):
            weight = layer.weight.detach()
            identity = torch.zeros(layer.in_channels, layer.in_channels, 3, 3)
            identity[range(layer.in_channels), range(layer.in_channels), 1, 1] = 1.0
            torch.testing.assert_close(weight[: layer.in_channels], identity, rtol=0, atol=0)
            if layer.out_channels > layer.in_channels:  # the remaining filters keep their random init
                rest = weight[layer.in_channels :]
                assert rest.abs().sum() > 0
                assert (rest != 0).float().mean() > 0.99
            # identity filters pass the input on unchanged
            x = torch.randn(1, layer.in_channels, 5, 5)
            torch.testing.assert_close(layer(x)[:, : layer.in_channels], x, rtol=0, atol=1e-6)
