"""EMA weights: validation swaps them in and the raw weights come back; the decay warms up so the
average forgets the initial weights early."""

import pytest
import torch
import torch.nn as nn

from linearsr.trainer.engine import EMA


def test_applied_swaps_the_ema_weights_in_and_the_raw_ones_back():
    model = nn.Linear(3, 2)
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    raw = model.weight.detach().clone()
    ema.update(model)  # decay 0.5, no warm-up without a step
    expected = ema.shadow["weight"].clone()
    with ema.applied(model):
        assert torch.equal(model.weight, expected)
    assert torch.equal(model.weight, raw)
    with pytest.raises(RuntimeError):
        with ema.applied(model):
            raise RuntimeError("validation failed")
    assert torch.equal(model.weight, raw)  # restored even when validation raises


def test_the_decay_warms_up_with_the_step():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, 0.9999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # decay min(0.9999, 1 / 10): the first update keeps 10 % of the start
    assert ema.shadow["weight"].item() == pytest.approx(0.9)
    for step in range(1, 300):
        ema.update(model, step)
    assert ema.shadow["weight"].item() > 0.99  # a fixed 0.9999 would still hold 97 % of the initial weights
