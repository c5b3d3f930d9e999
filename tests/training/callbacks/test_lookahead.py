"""Lookahead: the EMA schedule, the pull-and-restart of the weights, the final swap, and resuming its state."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cifarlab.callbacks.lookahead import Lookahead


def module_with(weight: float) -> SimpleNamespace:
    net = nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(weight)
    return SimpleNamespace(net=net)


def end_step(callback: Lookahead, module: SimpleNamespace, step: int, total: int) -> None:
    trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=total)
    callback.on_train_batch_end(trainer, module, None, None, step - 1)


def test_decay_grows_with_the_cube_of_progress():
    callback = Lookahead(every=5, decay=0.95**5, power=3.0)
    assert callback.decay_at(0, 100) == 0.0
    assert callback.decay_at(50, 100) == pytest.approx(0.95**5 / 8)
    assert callback.decay_at(100, 100) == pytest.approx(0.95**5)


def test_weights_follow_the_average_every_k_steps_and_become_it_at_the_end():
    callback = Lookahead(every=2, decay=0.5, power=1.0)
    module = module_with(0.0)
    callback.on_train_start(None, module)
    total, average, expected = 4, 0.0, []
    for step in range(1, total + 1):
        module.net.weight.data += 1.0  # what an optimizer step would do
        weight = module.net.weight.item()
        if step % 2 == 0:  # by hand: average += (1 - d) (w - average); w = average
            d = 0.5 * step / total
            average += (1 - d) * (weight - average)
            weight = average
        end_step(callback, module, step, total)
        assert module.net.weight.item() == pytest.approx(weight)
        expected.append(weight)
    # steps 1..4: w=1; w=2 -> avg 1.5; w=2.5; w=3.5 -> d=.5: avg 2.5
    assert expected == pytest.approx([1.0, 1.5, 2.5, 2.5])
    assert callback.average["weight"].item() == pytest.approx(2.5)


def test_last_step_swaps_in_the_average_even_off_the_grid():
    callback = Lookahead(every=5, decay=0.9, power=1.0)
    module = module_with(1.0)
    callback.on_train_start(None, module)
    callback.average["weight"].fill_(0.25)
    module.net.weight.data.fill_(3.0)
    end_step(callback, module, step=7, total=7)  # 7 is not a multiple of 5
    assert module.net.weight.item() == pytest.approx(0.25)


def test_buffers_are_averaged_and_integers_left_alone():
    callback = Lookahead(every=1, decay=0.5, power=0.0)  # d = 0.5 at every step
    module = SimpleNamespace(net=nn.BatchNorm1d(1))
    callback.on_train_start(None, module)
    assert set(callback.average) == {"weight", "bias", "running_mean", "running_var"}
    module.net.running_mean.fill_(2.0)
    end_step(callback, module, step=1, total=10)
    assert module.net.running_mean.item() == pytest.approx(1.0)
    assert module.net.num_batches_tracked.dtype == torch.long


def test_state_survives_a_checkpoint_round_trip():
    callback = Lookahead()
    module = module_with(2.0)
    callback.on_train_start(None, module)
    restored = Lookahead()
    restored.load_state_dict(callback.state_dict())
    restored.on_train_start(None, module_with(9.0))  # a resumed run keeps the saved average
    assert restored.average["weight"].item() == pytest.approx(2.0)


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="every"):
        Lookahead(every=0)
    with pytest.raises(ValueError, match="decay"):
        Lookahead(decay=1.5)
