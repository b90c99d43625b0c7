"""The log-SNR definitions every stage shares."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from linearsr.model.flow import (
    FlowConfig,
    Interval,
    bisect,
    check_partition,
    find_interval,
    interpolate,
    lambda_of_t,
    t_of_lambda,
    velocity_target,
)


@given(st.floats(min_value=1e-6, max_value=1 - 1e-6))
def test_t_lambda_round_trip(t):
    assert t_of_lambda(lambda_of_t(t)) == pytest.approx(t, rel=1e-9, abs=1e-12)


def test_t_lambda_round_trip_tensor_and_ends():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.allclose(t_of_lambda(lambda_of_t(t)), t)
    assert lambda_of_t(1.0) == -math.inf and lambda_of_t(0.0) == math.inf
    assert lambda_of_t(0.5) == 0.0


@given(st.integers(0, 5), st.floats(-20, -0.1), st.floats(0.1, 20))
@settings(max_examples=50)
def test_bisection_contiguous_disjoint_and_complete(depth, lo, hi):
    ivs = bisect(lo, hi, depth)
    assert len(ivs) == 2**depth
    check_partition(ivs)
    for lam in [-1e9, lo, (lo + hi) / 2, hi, 1e9, math.inf, -math.inf]:
        owners = [i for i, iv in enumerate(ivs) if iv.contains(lam)]
        assert len(owners) == 1, (lam, ivs)


def test_depth_two_gives_four_equal_lambda_intervals():
    ivs = bisect(-6, 6, 2)
    assert [iv.key for iv in ivs] == ["-inf,-3", "-3,0", "0,3", "3,inf"]
    assert find_interval(ivs, lambda_of_t(0.9)) == 0 and find_interval(ivs, lambda_of_t(0.1)) == 3


def test_interval_parse_and_errors():
    assert Interval.parse("-inf,-3") == Interval(-math.inf, -3)
    with pytest.raises(ValueError, match="LO,HI"):
        Interval.parse("1")
    with pytest.raises(ValueError, match="lo < hi"):
        Interval.parse("3,1")


@pytest.mark.parametrize("iv", FlowConfig().intervals() + [Interval(-0.5, 0.25)])
def test_sample_t_stays_inside_interval(iv):
    t = FlowConfig(shift=3.0, t1_fraction=0.0).sample_t(20000, iv, generator=torch.Generator().manual_seed(0))
    lam = lambda_of_t(t)
    assert all(iv.contains(float(x)) for x in lam)
    assert ((t > 0) & (t < 1)).all()


def test_unrestricted_t_is_logit_normal():
    cfg = FlowConfig(logit_mean=0.3, logit_std=0.8, t1_fraction=0.0)
    t = cfg.sample_t(200000, generator=torch.Generator().manual_seed(1)).double()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.3, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)


def test_validation_grid_is_fixed_and_inside():
    cfg = FlowConfig()
    for iv in cfg.intervals():
        g1, g2 = cfg.validation_grid(iv), cfg.validation_grid(iv)
        assert torch.equal(g1, g2) and len(g1) == cfg.val_points_per_interval
        assert all(iv.contains(float(lambda_of_t(t))) for t in g1)
    assert sum(cfg.mass(iv) for iv in cfg.intervals()) == pytest.approx(1.0)


def test_interpolation_endpoints_and_velocity():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(interpolate(x0, eps, torch.zeros(2)), x0)
    assert torch.allclose(interpolate(x0, eps, torch.ones(2)), eps)
    t = torch.tensor([0.3, 0.7])
    dt = 1e-3
    fd = (interpolate(x0, eps, t + dt) - interpolate(x0, eps, t)) / dt
    assert torch.allclose(fd, velocity_target(x0, eps), atol=1e-3)


def test_bad_flow_config_names_the_key():
    with pytest.raises(ValueError, match="logit_std"):
        FlowConfig(logit_std=0)
    with pytest.raises(ValueError, match="depth"):
        FlowConfig(bisection_depth=-1)


def test_the_mass_split_tree_halves_each_nodes_training_mass():
    cfg = FlowConfig(shift=3.0, bisection_depth=3)
    levels = cfg.tree()
    assert [len(level) for level in levels] == [1, 2, 4, 8] and levels[0][0].interval == Interval(-math.inf, math.inf)
    for k, level in enumerate(levels):
        check_partition([n.interval for n in level])
        for n in level:
            assert cfg.mass(n.interval) == pytest.approx(2.0 ** -k, abs=0.004)  # split points rounded to 0.01
            if k:
                parent = levels[k - 1][n.index // 2]
                assert n.parent_id == parent.id and parent.interval.lo <= n.interval.lo < n.interval.hi <= parent.interval.hi
    assert cfg.intervals() == [n.interval for n in levels[-1]]
    assert [iv.key for iv in FlowConfig(shift=3.0).intervals()] == ["-inf,-3.55", "-3.55,-2.2", "-2.2,-0.85", "-0.85,inf"]


def test_lambda_and_fixed_splits():
    assert [iv.key for iv in FlowConfig(split="lambda").intervals()] == ["-inf,-3", "-3,0", "0,3", "3,inf"]
    fixed = FlowConfig(split="fixed", split_points=(-4.0, -1.0, 2.0))
    assert [n.interval.key for n in fixed.tree()[1]] == ["-inf,-1", "-1,inf"]
    assert [iv.key for iv in fixed.intervals()] == ["-inf,-4", "-4,-1", "-1,2", "2,inf"]


@pytest.mark.parametrize("kw, message", [
    ({"split": "fixed", "split_points": (-1.0, 7.0, 8.0)}, r"flow.split_points \[7.0, 8.0\] lie outside the range"),
    ({"split": "fixed", "split_points": (0.0,)}, "flow.split_points needs 3 increasing"),
    ({"split": "fixed", "split_points": (1.0, 0.0, 2.0)}, "strictly increasing"),
    ({"split_points": (0.0, 1.0, 2.0)}, 'only read with flow.split = "fixed"'),
    ({"t1_fraction": 1.0}, "flow.t1_fraction must lie in"),
    ({"bisection_depth": 7}, "flow.bisection_depth must be in 0..6"),
])
def test_bad_tree_or_t1_settings_name_the_key(kw, message):
    with pytest.raises(ValueError, match=message):
        FlowConfig(**kw)


def test_a_share_of_every_batch_is_trained_at_t_1():
    cfg, gen = FlowConfig(shift=3.0, t1_fraction=0.1), torch.Generator().manual_seed(0)
    counts = [int((cfg.sample_t(8, generator=gen) == 1.0).sum()) for _ in range(400)]
    assert set(counts) == {0, 1} and sum(counts) / (8 * 400) == pytest.approx(0.1, abs=0.01)  # floor/ceil of 0.8
    assert int((cfg.sample_t(40, generator=gen) == 1.0).sum()) == 4
    noisiest, other = cfg.intervals()[0], cfg.intervals()[1]
    assert int((cfg.sample_t(40, noisiest, generator=gen) == 1.0).sum()) == 4  # its interval reaches t = 1
    assert not (cfg.sample_t(40, other, generator=gen) == 1.0).any()
    without = FlowConfig(shift=3.0, t1_fraction=0.0).sample_t(100000, generator=gen)
    assert (without > 0.99).float().mean() < 1e-3  # what the logit-normal alone would give the 1-NFE input


def test_sampling_times_follow_the_training_shift():
    from linearsr.model.flow import covering_steps, sampling_times, shifted

    assert sampling_times(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    grid = sampling_times(10, shift=3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in zip(grid, grid[1:]))
    logit = lambda t: math.log(t / (1 - t))  # noqa: E731
    assert logit(shifted(0.3, 3.0)) - logit(0.3) == pytest.approx(math.log(3.0))  # as FlowConfig.shift moves t
    cfg = FlowConfig(shift=3.0)
    n = covering_steps(cfg.intervals(), cfg.shift)
    owners = {find_interval(cfg.intervals(), lambda_of_t(t)) for t in sampling_times(n, cfg.shift)[:-1]}
    assert owners == {0, 1, 2, 3}
    assert covering_steps(cfg.intervals(), cfg.shift, at_least=n + 3) == n + 3
