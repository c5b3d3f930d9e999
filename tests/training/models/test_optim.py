"""Muon: the Newton–Schulz orthogonalisation, the update rule of each kind of group, and that it trains."""

import pytest
import torch
from torch import nn

from cifarlab.models.optim import Muon, newton_schulz


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (32, 32)])
def test_newton_schulz_sets_every_singular_value_near_one(shape):
    generator = torch.Generator().manual_seed(0)
    # A badly conditioned matrix: singular values spread over two orders of magnitude.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator))
    k = min(shape)
    matrix = u[:, :k] @ torch.diag(torch.logspace(-2, 0, k)) @ v[:, :k].T
    before = torch.linalg.svdvals(matrix)
    assert before.max() / before.min() > 50

    after = torch.linalg.svdvals(newton_schulz(matrix, steps=5))
    assert after.min() > 0.5 and after.max() < 1.3, after
    # and it keeps the directions: the result is close to U V^T of the input
    torch.testing.assert_close(newton_schulz(matrix, steps=5), u[:, :k] @ v[:, :k].T, atol=0.35, rtol=0)


def test_newton_schulz_rejects_non_matrices():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.ones(2, 3, 4))


def test_sgd_groups_match_torch_sgd_exactly():
    torch.manual_seed(0)
    ours, reference = nn.Linear(5, 3), nn.Linear(5, 3)
    reference.load_state_dict(ours.state_dict())
    options = {"lr": 0.1, "momentum": 0.85, "nesterov": True, "weight_decay": 0.01}
    muon = Muon(ours.parameters(), orthogonalize=False, **options)
    sgd = torch.optim.SGD(reference.parameters(), **options)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    for _ in range(4):
        for model, optimizer in ((ours, muon), (reference, sgd)):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_orthogonalised_step_of_a_filter_bank():
    conv = nn.Conv2d(4, 8, 3, bias=False)
    before = conv.weight.detach().clone()
    conv.weight.grad = torch.randn_like(conv.weight)
    optimizer = Muon([conv.weight], lr=0.1, momentum=0.0, ns_steps=5)
    optimizer.step()
    step = (before - conv.weight.detach()) / 0.1
    singular_values = torch.linalg.svdvals(step.reshape(8, -1))
    assert singular_values.min() > 0.5 and singular_values.max() < 1.3


def test_normalize_weights_fixes_each_filter_bank_norm():
    conv = nn.Conv2d(4, 8, 3, bias=False)
    conv.weight.data.mul_(7.0)
    conv.weight.grad = torch.randn_like(conv.weight)
    Muon([conv.weight], lr=0.0, normalize_weights=True).step()  # lr 0: only the normalisation acts
    assert conv.weight.norm().item() == pytest.approx(8**0.5, rel=1e-5)


def test_muon_lowers_a_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    x = torch.randn(64, 3, 4, 4)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    conv_weight, head_weight = model[0].weight, model[3].weight
    biases = [model[0].bias, model[3].bias]
    optimizer = Muon(
        [
            {"params": [conv_weight]},
            {"params": [head_weight, *biases], "orthogonalize": False, "lr": 0.1},
        ],
        lr=0.05,
        momentum=0.6,
    )
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_step_evaluates_a_closure():
    weight = nn.Parameter(torch.ones(2, 2))

    def closure():
        weight.grad = torch.eye(2)
        return 3.0

    assert Muon([weight], lr=0.1).step(closure) == 3.0
    assert not torch.equal(weight.detach(), torch.ones(2, 2))


@pytest.mark.parametrize("option", [{"lr": -1.0}, {"momentum": 1.0}, {"ns_steps": 0}, {"weight_decay": -0.1}])
def test_invalid_options_are_refused(option):
    with pytest.raises(ValueError, match="Muon needs"):
        Muon([nn.Parameter(torch.ones(2, 2))], **option)
