"""The per-step learning-rate factors of the triangle and cosine schedules."""

import math
from itertools import pairwise

import pytest
import torch

from cifarlab.models.schedules import cosine, triangle

BASE_LR = 0.5


def make_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)


def factors(schedule, total_steps: int, **kwargs) -> list[float]:
    """The factor at every step 0..total_steps, read from the LambdaLR's function."""
    scheduler = schedule(make_optimizer(), total_steps=total_steps, **kwargs)
    (factor,) = scheduler.lr_lambdas
    return [factor(step) for step in range(total_steps + 1)]


def assert_up_then_down(values: list[float], peak: int) -> None:
    assert all(a < b for a, b in pairwise(values[: peak + 1])), "not rising to the peak"
    assert all(a > b for a, b in pairwise(values[peak:])), "not falling after it"


def test_triangle_key_points():
    values = factors(triangle, 100, peak_fraction=0.2, start=0.1, end=0.0)
    assert values[0] == pytest.approx(0.1, abs=1e-12)
    assert values[10] == pytest.approx(0.55, abs=1e-12)  # half-way up: 0.1 + 0.9 / 2
    assert values[20] == pytest.approx(1.0, abs=1e-12)
    assert values[60] == pytest.approx(0.5, abs=1e-12)  # half-way down
    assert values[100] == pytest.approx(0.0, abs=1e-12)
    assert max(values) == values[20]
    assert_up_then_down(values, peak=20)


def test_triangle_decays_to_end_and_stays_there():
    scheduler = triangle(make_optimizer(), total_steps=50, peak_fraction=0.1, start=0.3, end=0.2)
    (factor,) = scheduler.lr_lambdas
    assert factor(0) == pytest.approx(0.3)
    assert factor(5) == pytest.approx(1.0)
    assert factor(50) == pytest.approx(0.2)
    assert factor(51) == pytest.approx(0.2)  # an extra step past the end does not go below `end`
    assert factor(500) == pytest.approx(0.2)
    assert_up_then_down([factor(step) for step in range(51)], peak=5)


def test_cosine_key_points():
    values = factors(cosine, 100, peak_fraction=0.1, start=0.0, end=0.05)
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert values[5] == pytest.approx(0.5, abs=1e-12)
    assert values[10] == pytest.approx(1.0, abs=1e-12)
    assert values[55] == pytest.approx(0.05 + 0.95 * 0.5, abs=1e-12)  # half-way through the cosine
    assert values[100] == pytest.approx(0.05, abs=1e-12)
    expected = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 30 / 90))
    assert values[40] == pytest.approx(expected, abs=1e-12)
    assert_up_then_down(values, peak=10)


def test_cosine_default_warmup_and_clamp():
    scheduler = cosine(make_optimizer(), total_steps=200)  # peak_fraction 0.05: the peak is step 10
    (factor,) = scheduler.lr_lambdas
    assert factor(0) == 0.0
    assert factor(10) == pytest.approx(1.0)
    assert factor(200) == pytest.approx(0.0, abs=1e-12)
    assert factor(250) == pytest.approx(0.0, abs=1e-12)
    assert_up_then_down([factor(step) for step in range(201)], peak=10)


@pytest.mark.parametrize("schedule", [triangle, cosine])
def test_optimizer_lr_follows_the_factor(schedule):
    optimizer = make_optimizer()
    scheduler = schedule(optimizer, total_steps=20, peak_fraction=0.25, start=0.2, end=0.1)
    (factor,) = scheduler.lr_lambdas
    seen = []
    for _ in range(21):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([BASE_LR * factor(step) for step in range(21)])
    assert seen[0] == pytest.approx(BASE_LR * 0.2)
    assert seen[5] == pytest.approx(BASE_LR)
    assert seen[20] == pytest.approx(BASE_LR * 0.1)


@pytest.mark.parametrize("schedule", [triangle, cosine])
def test_zero_peak_fraction_peaks_after_one_step(schedule):
    (factor,) = schedule(make_optimizer(), total_steps=10, peak_fraction=0.0, start=0.25).lr_lambdas
    assert factor(0) == pytest.approx(0.25)
    assert factor(1) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", [triangle, cosine])
@pytest.mark.parametrize("total_steps", [0, -1, -100])
def test_invalid_total_steps(schedule, total_steps):
    with pytest.raises(ValueError, match="total_steps"):
        schedule(make_optimizer(), total_steps=total_steps)


@pytest.mark.parametrize("schedule", [triangle, cosine])
@pytest.mark.parametrize("peak_fraction", [-0.1, 1.0, 1.5])
def test_invalid_peak_fraction(schedule, peak_fraction):
    with pytest.raises(ValueError, match="peak_fraction"):
        schedule(make_optimizer(), total_steps=100, peak_fraction=peak_fraction)
