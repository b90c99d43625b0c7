"""Samplers and the SNR mixture of experts: step counts, routing, determinism."""

import math

import pytest
import torch

from linearsr.model.config import ModelConfig
from linearsr.model.flow import FULL_RANGE, Interval, bisect, lambda_of_t
from linearsr.model.network import LinearSR
from linearsr.model.sampler import MoE, sample


def tiny(seed=0) -> LinearSR:
    torch.manual_seed(seed)
    model = LinearSR(ModelConfig.preset("cpu_tiny", width=32, depth=1, heads=2))
    with torch.no_grad():
        model.final.weight.normal_(0, 0.05)  # not the zero init: experts must differ
    return model


@pytest.mark.parametrize("steps, method, nfe", [(1, "euler", 1), (4, "euler", 4), (1, "heun", 1), (4, "heun", 7)])
def test_step_counts(steps, method, nfe):
    res = sample(tiny(), torch.rand(1, 3, 6, 6), steps=steps, method=method)
    assert res.image.shape == (1, 3, 24, 24)
    assert 0 <= res.image.min() and res.image.max() <= 1
    assert res.nfe == nfe
    assert res.route[0][0] == 1.0 and res.route[0][1] == -math.inf


def test_every_evaluation_runs_the_expert_owning_its_lambda():
    intervals = bisect(-6.0, 6.0, 2)
    moe = MoE([tiny(i) for i in range(4)], intervals)
    res = sample(moe, torch.rand(2, 3, 5, 5), steps=8, method="heun")
    assert res.nfe == 15
    for t, lam, i in res.route:
        assert lam == lambda_of_t(t) and intervals[i].contains(lam)
    assert {i for _, _, i in res.route} == {0, 1, 2, 3}
    # the experts really differ, so routing matters
    single = [sample(MoE([e]), torch.zeros(1, 3, 5, 5), steps=1) for e in moe.experts]
    assert len({round(float(s.image.mean()), 6) for s in single}) == 4


def test_moe_matches_manual_routing():
    intervals = [Interval(-math.inf, 0.0), Interval(0.0, math.inf)]
    a, b = tiny(1), tiny(2)
    lr = torch.rand(1, 3, 4, 4)
    res = sample(MoE([a, b], intervals), lr, steps=2, seed=3)
    # t = 1 (lambda = -inf) -> a;  t = 0.5 (lambda = 0) -> b
    assert [i for _, _, i in res.route] == [0, 1]
    cond = a.encode_condition(lr)
    x = torch.randn(cond.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = x - 0.5 * a.eval().velocity(x, 1.0, cond, [[]])
        x = x - 0.5 * b.eval().velocity(x, 0.5, cond, [[]])
    torch.testing.assert_close(res.image, a.decode(x, lr), atol=1e-5, rtol=0)


def test_single_model_is_k1_and_seeded():
    model = tiny().eval()
    lr = torch.rand(1, 3, 4, 4)
    r1, r2 = sample(model, lr, steps=3, seed=7), sample(MoE([model], [FULL_RANGE]), lr, steps=3, seed=7)
    torch.testing.assert_close(r1.image, r2.image)
    assert {i for *_, i in r1.route} == {0}
    assert not torch.equal(r1.image, sample(model, lr, steps=3, seed=8).image)
    assert not model.training  # sampling leaves the caller's train/eval mode alone
    model.train()
    sample(model, lr)
    assert model.training and all(m.training for m in model.modules())


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(tiny(), torch.rand(1, 3, 4, 4), steps=0)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        sample(tiny(), torch.rand(1, 3, 4, 4), method="ddim")
    with pytest.raises(ValueError, match="cover all log-SNR"):
        MoE([tiny(), tiny()], [Interval(-math.inf, 0.0), Interval(0.0, 5.0)])
    with pytest.raises(ValueError, match="one log-SNR interval per expert"):
        MoE([tiny(), tiny()])
