"""Knee and divergence detection on synthetic validation curves.

Curves: val(step) = 0.5 * exp(-step / 600) + 0.1 (+ Gaussian noise), one validation every 100
steps. The reference knee is Kneedle on the noise-free curve with no smoothing. Stated
tolerances: within 1 validation of it on the clean curve after smoothing, within 3 validations
with noise of sigma 0.01 (2 % of the total drop)."""

import math
import random

import pytest

from linearsr.ckpt_analysis.config import DivergenceConfig, ESGFConfig, KneeConfig, esgf_from_config, expert_intervals
from linearsr.ckpt_analysis.knee import detect_divergence, find_knee, smooth, still_falling

EVERY = 100


def curve(n=40, noise=0.0, seed=0):
    rng = random.Random(seed)
    steps = [EVERY * (i + 1) for i in range(n)]
    return steps, [0.5 * math.exp(-s / 600) + 0.1 + rng.gauss(0, noise) for s in steps]


def knee_step(steps, vals, cfg=KneeConfig()):
    k = find_knee(steps, smooth(vals, cfg.smoothing, cfg.window), cfg)
    return None if k is None else steps[k]


def reference_knee(n):
    steps, clean = curve(n)
    return knee_step(steps, clean, KneeConfig(smoothing="none"))


@pytest.mark.parametrize("n", [20, 40, 60])
def test_clean_decay_and_plateau_knee_within_one_validation(n):
    steps, vals = curve(n)
    ref = reference_knee(n)
    assert ref is not None
    assert abs(knee_step(steps, vals) - ref) <= EVERY
    # the knee is where most of the improvement is done, not deep in the plateau
    done = 1 - math.exp(-knee_step(steps, vals) / 600)
    assert 0.75 <= done <= 0.97


@pytest.mark.parametrize("seed", range(5))
def test_noisy_curve_knee_within_three_validations(seed):
    steps, vals = curve(40, noise=0.01, seed=seed)
    assert abs(knee_step(steps, vals) - reference_knee(40)) <= 3 * EVERY


def test_smoothing_removes_a_single_spike_and_causal_never_sees_the_future():
    vals = [1.0] * 10 + [5.0] + [1.0] * 10
    assert max(smooth(vals, "median_ema", 5)) < 1.05
    step = [1.0] * 10 + [2.0] * 10
    causal = smooth(step, "ema", 5, causal=True)
    assert causal[:10] == pytest.approx([1.0] * 10)  # nothing moves before the jump happened
    assert causal[-1] > 1.9
    with pytest.raises(ValueError, match="smoothing method 'gauss'"):
        smooth(step, "gauss", 5)


def test_flat_or_too_short_curve_has_no_knee():
    assert find_knee([100, 200, 300, 400], [0.5, 0.5, 0.5, 0.5], KneeConfig()) is None
    assert find_knee([100, 200], [0.5, 0.4], KneeConfig()) is None


def test_no_false_divergence_on_a_noisy_plateau():
    for seed in range(10):  # noise 5 % of the plateau's level
        steps, vals = curve(60, noise=0.005, seed=seed)
        assert detect_divergence(steps, vals, DivergenceConfig()) is None


def test_nan_val_or_train_loss_is_divergence_at_that_step():
    steps, vals = curve(30)
    vals[20] = math.nan
    d = detect_divergence(steps, vals, DivergenceConfig())
    assert (d.kind, d.step) == ("nonfinite", steps[20])
    train = [1.0] * 30
    train[12] = math.inf
    d = detect_divergence(steps, curve(30)[1], DivergenceConfig(), train_loss=train)
    assert (d.kind, d.step) == ("nonfinite", steps[12]) and "train loss is inf" in d.detail


def test_spike_above_factor_times_best_is_divergence():
    steps, vals = curve(30)
    vals[25] = 2.5 * min(vals[:25])
    d = detect_divergence(steps, vals, DivergenceConfig(spike_factor=2.0))
    assert (d.kind, d.step) == ("spike", steps[25])


@pytest.mark.parametrize("seed", range(4))
def test_late_sustained_rise_onset_within_tolerance(seed):
    steps, vals = curve(50, noise=0.005, seed=seed)
    start = 35  # the loss climbs 4 % per validation from here on
    for i in range(start, 50):
        vals[i] = vals[start - 1] * (1.04 ** (i - start + 1))
    d = detect_divergence(steps, vals, DivergenceConfig(rise_fraction=0.1, window=3))
    assert d is not None and d.kind == "rise"
    assert steps[start] - EVERY <= d.step <= steps[start] + 4 * EVERY


def test_still_falling_until_the_curve_flattens():
    cfg = KneeConfig()
    _, early = curve(12)
    assert still_falling(smooth(early), cfg) is not None
    _, late = curve(40)
    assert still_falling(smooth(late), cfg) is None


def test_esgf_config_rejects_unknown_keys_and_bad_values_by_name():
    with pytest.raises(ValueError, match="esgf.knee.windw"):
        esgf_from_config({"esgf": {"knee": {"windw": 5}}})
    with pytest.raises(ValueError, match="esgf.divergence.spike_factor"):
        esgf_from_config({"esgf": {"divergence": {"spike_factor": 0.5}}})
    with pytest.raises(ValueError, match="esgf.experts.overrides"):
        esgf_from_config({"esgf": {"experts": {"overrides": ["optim.lr"]}}})
    cfg = esgf_from_config({"esgf": {"experts": {"depth": 3}}})
    assert len(expert_intervals({}, cfg)) == 8
    assert len(expert_intervals({"flow": {"bisection_depth": 2}}, ESGFConfig())) == 4
