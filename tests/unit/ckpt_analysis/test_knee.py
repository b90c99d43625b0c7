"""The knee rule as the method means it, tested online: every prefix of a curve is what the
sidecar sees at some poll.

Curves (one validation every `every` steps, a budget of run.steps):
- exponential   0.5 exp(-step / 600) + 0.1, every 100 steps, budget 6000;
- power law     0.1 + (step + 1000)^-alpha, base_x4's cadence (every 2000 steps, budget 200k);
- late divergence: an exponential decay that starts climbing at a given validation;
- noisy plateau: a straight drop that stops dead at step 600, every 50 steps.
Noise is Gaussian, given as a share of the curve's total drop. "Unused" is what the chosen
validation leaves of the drop to the end of the budget: (L(knee) - L_end) / (L_first - L_end),
measured on the noise-free curve."""

import math
import os
import random

import pytest

from linearsr.ckpt_analysis.config import DivergenceConfig, ESGFConfig, KneeConfig, esgf_from_config
from linearsr.ckpt_analysis.knee import check_prefix, detect_divergence, find_knee, smooth

CFG = KneeConfig()
TOL = CFG.tolerance


def family(kind: str, alpha: float = 0.5) -> tuple[list[int], list[float], int]:
    """(steps, noise-free losses, budget)."""
    if kind == "exp":
        steps = [100 * (i + 1) for i in range(60)]
        return steps, [0.5 * math.exp(-s / 600) + 0.1 for s in steps], 6000
    if kind == "power":
        steps = [2000 * (i + 1) for i in range(100)]
        return steps, [0.1 + (s + 1000) ** -alpha for s in steps], 200_000
    if kind == "plateau":
        steps = [50 * (i + 1) for i in range(40)]
        return steps, [max(0.7, 1.0 - 0.3 * s / 600) for s in steps], 2000
    raise AssertionError(kind)


def noisy(clean: list[float], share: float, seed: int) -> list[float]:
    rng, drop = random.Random(seed), clean[0] - min(clean)
    return [v + rng.gauss(0, share * drop) for v in clean]


def unused(clean: list[float], index: int) -> float:
    return (clean[index] - min(clean)) / (clean[0] - min(clean))


def online(steps, values, budget, cfg=CFG, every=1):
    """The knee found on each prefix (None while not yet fired): the sidecar's view."""
    return {n: find_knee(steps[:n], values[:n], cfg, budget)[0] for n in range(1, len(values) + 1, every)}


@pytest.mark.parametrize("kind, share, seed", [("exp", 0.0, 0), ("exp", 0.01, 1), ("exp", 0.02, 2),
                                               ("power", 0.0, 0), ("power", 0.01, 3), ("plateau", 0.01, 4)])
def test_a_confirmed_knee_stays_the_same_on_every_longer_prefix(kind, share, seed):
    steps, clean, budget = family(kind)
    values = noisy(clean, share, seed)
    seen = online(steps, values, budget, every=1 if kind != "power" else 3)
    fired = [n for n, k in seen.items() if k is not None]
    assert fired, "the rule never fired"
    first = seen[fired[0]]
    assert all(seen[n] is not None and (seen[n].index, seen[n].fired) == (first.index, first.fired)
               for n in seen if n >= fired[0])
    assert first.fired == fired[0] - 1 or kind == "power"  # decided on the prefix it fired on


@pytest.mark.parametrize("kind, alpha", [("exp", 0), ("power", 0.3), ("power", 0.5), ("power", 1.0)])
def test_no_decision_while_the_recent_validations_still_improve_by_more_than_the_tolerance(kind, alpha):
    steps, clean, budget = family(kind, alpha)
    w = CFG.window
    for n in range(w, len(clean) + 1):
        recent = (clean[n - w] - clean[n - 1]) / (clean[0] - clean[n - 1])
        if recent > TOL:
            assert find_knee(steps[:n], clean[:n], CFG, budget)[0] is None, f"fired at step {steps[n - 1]}"


@pytest.mark.parametrize("kind, alpha, share, confidence, seeds, allowed", [
    ("exp", 0, 0.0, 0.0, [0], TOL), ("exp", 0, 0.01, 0.0, range(6), TOL + 0.02),
    ("power", 0.3, 0.0, 0.0, [0], TOL), ("power", 0.5, 0.0, 0.0, [0], TOL), ("power", 1.0, 0.0, 0.0, [0], TOL),
    # noise as large as a power-law tail's gain per validation: base_x4's confidence = 1 keeps the bound
    ("power", 0.3, 0.003, 1.0, range(4), TOL + 0.03), ("power", 0.5, 0.003, 1.0, range(4), TOL + 0.03),
])
def test_the_knee_leaves_at_most_the_tolerance_of_the_drop_to_the_end_of_the_budget(kind, alpha, share, confidence,
                                                                                    seeds, allowed):
    steps, clean, budget = family(kind, alpha)
    for seed in seeds:
        knee, _ = find_knee(steps, noisy(clean, share, seed), KneeConfig(confidence=confidence), budget)
        assert knee is not None
        assert unused(clean, knee.index) <= allowed, (seed, steps[knee.index], unused(clean, knee.index))
    if kind == "power":  # not at a few % of a 200k budget, as a knee of the points seen so far would be
        assert steps[knee.index] >= 0.25 * budget


@pytest.mark.parametrize("seed", range(6))
def test_a_noisy_plateau_fires_within_a_few_validations_of_its_start(seed):
    steps, clean, budget = family("plateau")
    start = steps.index(600)
    knee, _ = find_knee(steps, noisy(clean, 0.01, seed), CFG, budget)
    assert knee is not None and knee.fired - start <= CFG.window + CFG.patience + 2, steps[knee.fired]
    assert abs(knee.index - start) <= 2  # the knee itself is at the corner


@pytest.mark.parametrize("seed", range(4))
def test_a_late_divergence_is_cut_before_its_onset_near_the_best_loss(seed):
    from linearsr.ckpt_analysis.decision import analyze
    from linearsr.model.flow import FlowConfig

    steps = [100 * (i + 1) for i in range(50)]
    for onset in (20, 36):  # before the knee could be confirmed, and long after
        clean = [0.5 * math.exp(-s / 400) + 0.1 + (0.003 * (i - onset) ** 2 if i > onset else 0.0)
                 for i, s in enumerate(steps)]
        values = noisy(clean, 0.01, seed)
        records = [{"step": s, "val_loss": v, "train_loss": v, "checkpoint": f"ckpt_{s}"} for s, v in zip(steps, values)]
        for n in range(6, 51):  # online: the first prefix with a decision
            d = analyze(records[:n], ESGFConfig(), FlowConfig(), budget=5000).decision
            if d is not None:
                break
        assert d is not None
        i = steps.index(d["checkpoint_step"])
        assert i <= onset
        best = min(clean[:onset + 1])
        assert (clean[i] - best) / (clean[0] - best) <= TOL + 0.02, (onset, d["checkpoint_step"], d["method"])


def test_smoothing_has_no_lag():
    steps = [100 * (i + 1) for i in range(30)]
    line = [1.0 - 0.2 * math.log(s) for s in steps]  # straight in log(step): the smoothed curve is the curve
    assert smooth(steps, line, 5) == pytest.approx(line, abs=1e-12)
    steps, clean, _ = family("exp")
    drop, smoothed = clean[0] - min(clean), smooth(steps, clean, 5)
    assert max(abs(a - b) for a, b in zip(smoothed, clean)) <= 0.035 * drop  # the steep start bends the lines most
    assert max(abs(a - b) for a, b in zip(smoothed[5:], clean[5:])) <= 0.01 * drop
    assert abs(smoothed[-1] - clean[-1]) <= 0.001 * drop  # the end, where the decision is taken
    values = noisy(clean, 0.02, 0)
    late = [v - s for v, s in zip(values, smooth(steps, values, 5))][10:]
    assert sum(r > 0 for r in late) >= len(late) // 4 and sum(r < 0 for r in late) >= len(late) // 4


def test_a_single_wild_validation_does_not_fire_or_move_the_knee():
    steps, clean, budget = family("exp")
    spiked = list(clean)
    spiked[8] = clean[8] * 0.5  # one validation far too good
    assert find_knee(steps[:12], spiked[:12], CFG, budget)[0] is None
    assert find_knee(steps, spiked, CFG, budget)[0].index == find_knee(steps, clean, CFG, budget)[0].index


def test_each_knob_moves_the_decision_the_way_the_docs_say():
    steps, clean, budget = family("exp")
    values = noisy(clean, 0.01, 0)

    def fired(curve=clean, **kw):
        knee, _ = find_knee(steps, curve, KneeConfig(**kw), budget)
        return knee.fired

    assert fired(tolerance=0.1) < fired() < fired(tolerance=0.02)
    assert fired(window=3) < fired() < fired(window=9, min_validations=9)
    assert fired(patience=1) < fired() < fired(patience=4)
    assert fired(values) < fired(values, confidence=1.0) < fired(values, confidence=3.0)
    assert fired(min_validations=40) == 40  # evaluated from 40 validations on, held on 2 in a row
    check = check_prefix(steps[:10], values[:10], CFG, budget)
    assert check.projected > 0 and not check.holds  # early on, the rate projects most of the drop still to come
    assert check_prefix(steps[:10], values[:10], CFG, None).projected == 0  # no budget: no projection


def test_no_false_divergence_on_a_noisy_plateau():
    steps, clean, _ = family("exp")
    for seed in range(10):
        assert detect_divergence(steps, noisy(clean, 0.01, seed), DivergenceConfig()) is None


def test_nan_val_or_train_loss_is_divergence_at_that_step():
    steps, clean, _ = family("exp")
    vals = list(clean)
    vals[20] = math.nan
    d = detect_divergence(steps, vals, DivergenceConfig())
    assert (d.kind, d.step, d.seen) == ("nonfinite", steps[20], 20)
    train = [1.0] * len(steps)
    train[12] = math.inf
    d = detect_divergence(steps, clean, DivergenceConfig(), train_loss=train)
    assert (d.kind, d.step) == ("nonfinite", steps[12]) and "train loss is inf" in d.detail


def test_spike_above_factor_times_best_is_divergence():
    steps, clean, _ = family("exp")
    vals = list(clean)
    vals[25] = 2.5 * min(vals[:25])
    d = detect_divergence(steps, vals, DivergenceConfig(spike_factor=2.0))
    assert (d.kind, d.step) == ("spike", steps[25])


@pytest.mark.parametrize("seed", range(4))
def test_late_sustained_rise_onset_within_tolerance(seed):
    steps, clean, _ = family("exp")
    vals = noisy(clean, 0.01, seed)[:50]
    start = 35  # the loss climbs 4 % per validation from here on
    for i in range(start, 50):
        vals[i] = vals[start - 1] * (1.04 ** (i - start + 1))
    d = detect_divergence(steps[:50], vals, DivergenceConfig(rise_fraction=0.1, window=3))
    assert d is not None and d.kind == "rise" and d.seen > d.index
    assert steps[start] - 100 <= d.step <= steps[start] + 400
    assert detect_divergence(steps[:d.seen], vals[:d.seen], DivergenceConfig(rise_fraction=0.1, window=3)) is None


@pytest.mark.parametrize("table, key", [
    ({"knee": {"windw": 5}}, "esgf.knee.windw"),
    ({"knee": {"window": 2}}, "esgf.knee.window"),
    ({"knee": {"tolerance": 1.5}}, "esgf.knee.tolerance"),
    ({"knee": {"patience": 0}}, "esgf.knee.patience"),
    ({"knee": {"min_validations": 3}}, "esgf.knee.min_validations"),
    ({"divergence": {"spike_factor": 0.5}}, "esgf.divergence.spike_factor"),
    ({"experts": {"overrides": ["optim.lr"]}}, "esgf.experts.overrides"),
    ({"experts": {"init": "parent"}}, "esgf.experts.init"),
    ({"experts": {"init": "per_interval", "full_range_first": True}}, "esgf.experts.init"),
    ({"experts": {"share_workers": True, "overrides": ["cluster.num_workers=2"]}}, "esgf.experts.overrides sets cluster.num_workers"),
])
def test_esgf_config_rejects_unknown_keys_and_bad_values_by_name(table, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        esgf_from_config({"esgf": table})


# cpu_tiny's own curve (EMA weights, constant LR 2e-3), measured with `linearsr train --config
# configs/cpu_tiny.toml` to step 800 and resumed to 1200: it still falls ~linearly in log(step)
CPU_TINY_STEPS = list(range(50, 1201, 50))
CPU_TINY_VAL = [1.2339, 1.1725, 1.1104, 1.0808, 1.0184, 0.9636, 0.895, 0.8521, 0.802, 0.771, 0.7426, 0.7176,
                0.6967, 0.6786, 0.6673, 0.6545, 0.6444, 0.6374, 0.6326, 0.6248, 0.6193, 0.6101, 0.6031, 0.5937]


def test_the_demo_preset_stops_its_still_falling_pretrain_once_a_tenth_of_the_drop_is_left():
    from linearsr.trainer.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "cpu_tiny.toml"))
    knee_cfg = esgf_from_config(cfg.to_dict()).knee
    budget = cfg.run.steps
    n = CPU_TINY_STEPS.index(budget) + 1
    knee, _ = find_knee(CPU_TINY_STEPS[:n], CPU_TINY_VAL[:n], knee_cfg, budget)
    assert knee is not None and CPU_TINY_STEPS[knee.fired] < budget  # stopped before the budget's end
    assert 600 <= CPU_TINY_STEPS[knee.index] <= 850
    # at 5 % the rule waits for the budget's last validation: the curve is nowhere near a plateau
    strict, _ = find_knee(CPU_TINY_STEPS[:n], CPU_TINY_VAL[:n], KneeConfig(**{**vars(knee_cfg), "tolerance": 0.05}),
                          budget)
    assert strict is None or CPU_TINY_STEPS[strict.fired] == budget
