"""The ESGF decision: the earliest checkpoint at the knee, taken once online and the same on every
later look, never at or after divergence, with a clear "no decision yet" while the run trains;
the knee of every log-SNR interval beside it."""

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from linearsr.ckpt_analysis.config import ESGFConfig, KneeConfig
from linearsr.ckpt_analysis.decision import analyze, manual_decision
from linearsr.model.flow import FlowConfig

CFG = ESGFConfig()
FLOW = FlowConfig()  # leaves -inf,-1.35 | -1.35,0 | 0,1.35 | 1.35,inf; level 1: -inf,0 | 0,inf
LEAVES = [iv.key for iv in FLOW.intervals()]
BUDGET = 6000


def records(n=40, noise=0.005, seed=0, ckpt_every=2, nan_from=None, every=100, first_ckpt=1, ema=False):
    """metrics.jsonl records of a decaying curve; a checkpoint every `ckpt_every` validations.
    The leaves decay at different rates: the noisiest (first) interval is still falling at the end."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        step = every * (i + 1)
        v = 0.5 * math.exp(-step / 600) + 0.1 + rng.gauss(0, noise)
        if nan_from is not None and step >= nan_from:
            v = math.nan
        ckpt = f"runs/x/checkpoints/checkpoint_{step:06d}" if (i + 1) % ckpt_every == 0 and i + 1 >= first_ckpt else None
        by = {k: 0.4 * math.exp(-step / tau) + 0.2 for k, tau in zip(LEAVES, (3000, 400, 250, 150))}
        rec = {"step": step, "val_loss": v, "train_loss": v, "checkpoint": ckpt, "val_loss_by_interval": by}
        if ema:
            rec["val_loss_raw"] = v + 0.01
        out.append(rec)
    return out


def first_decision(recs, cfg=CFG, **kw):
    """Feed the records to analyze() as the sidecar sees them grow: (prefix length, decision)."""
    for n in range(1, len(recs) + 1):
        d = analyze(recs[:n], cfg, FLOW, BUDGET, **kw).decision
        if d is not None:
            return n, d
    return None, None


def test_too_short_says_how_many_validations_are_missing():
    a = analyze(records(4), CFG, FLOW, BUDGET)
    assert a.decision is None
    assert a.reason == "no knee yet: 4 validations, need ≥ 6"


def test_no_decision_while_the_curve_still_falls_and_the_reason_gives_the_numbers():
    a = analyze(records(12, noise=0.0), CFG, FLOW, BUDGET)
    assert a.decision is None
    assert a.reason.startswith("no knee yet at step 1200: the last 5 validations gained ")
    assert "more by step 6000" in a.reason and "the rule fires at ≤ 5%" in a.reason


def test_the_decision_is_taken_once_online_and_every_later_look_agrees():
    recs = records(60, noise=0.005)
    n, d = first_decision(recs)
    assert d is not None and d["method"] == "knee"
    assert d["confirmed_at"] == recs[n - 1]["step"]  # decided on the validation where the rule fired
    keys = ("checkpoint", "checkpoint_step", "knee_step", "confirmed_at", "method", "intervals")
    for m in range(n, 61):
        later = analyze(recs[:m], CFG, FLOW, BUDGET).decision
        assert {k: later[k] for k in keys} == {k: d[k] for k in keys}, m
    assert {k: v for k, v in analyze(recs, CFG, FLOW, BUDGET, finished=True).decision.items() if k in keys} == \
        {k: d[k] for k in keys}


def test_a_confirmed_knee_takes_the_earliest_checkpoint_at_or_below_the_threshold():
    a = analyze(records(40), CFG, FLOW, BUDGET)
    d = a.decision
    assert d is not None and d["method"] == "knee"
    index = {s: i for i, s in enumerate(a.curve.steps)}
    threshold = d["rule"]["threshold"]
    below = [r["step"] for r in records(40) if r["checkpoint"] and r["step"] <= d["confirmed_at"]
             and a.knee.check.smoothed[index[r["step"]]] <= threshold]
    assert d["checkpoint_step"] == below[0] >= d["knee_step"]
    assert d["checkpoint"].endswith(f"checkpoint_{d['checkpoint_step']:06d}")
    assert d["diverged_at"] is None and d["params"]["knee"]["tolerance"] == 0.05 and d["params"]["init"] == "knee"
    assert d["curve"]["validations"] == 40 and d["curve"]["weights"] == "raw" and "knee at step" in d["reason"]
    assert d["rule"]["budget"] == BUDGET and d["rule"]["recent"] + d["rule"]["projected"] <= \
        0.05 * (d["rule"]["drop"] + d["rule"]["projected"])


def test_every_interval_and_the_tree_halves_get_their_own_knee():
    d = analyze(records(60, noise=0.0), CFG, FLOW, BUDGET, finished=True).decision
    per = d["intervals"]
    assert list(per) == ["-inf,-1.35", "-inf,0", "-1.35,0", "0,1.35", "0,inf", "1.35,inf"]
    knees = [per[k]["knee_step"] for k in LEAVES[1:]]
    assert all(k is not None for k in knees) and knees == sorted(knees, reverse=True)  # slower decay: later knee
    assert knees[-1] < knees[0] < d["confirmed_at"]
    # still falling when the pretrain's own knee fired: no knee of its own, its best checkpoint so far
    slow = per[LEAVES[0]]
    assert (slow["knee_step"], slow["method"], slow["checkpoint_step"]) == (None, "best", d["confirmed_at"])
    assert per["0,inf"]["method"] == "knee" and per["0,1.35"]["knee_step"] >= per["0,inf"]["knee_step"]
    for v in per.values():  # the checkpoint each would start from (esgf.experts.init = "per_interval")
        assert v["checkpoint"].endswith(f"checkpoint_{v['checkpoint_step']:06d}")


def test_nan_divergence_decides_at_once_and_excludes_later_checkpoints():
    recs = records(30, nan_from=1200)
    a = analyze(recs, CFG, FLOW, BUDGET)  # run still "training": divergence is reason enough to decide
    d = a.decision
    assert d is not None and d["diverged_at"] == 1200 and d["method"] == "best_before_divergence"
    assert d["checkpoint_step"] == 1000 and d["confirmed_at"] == 1200  # the lowest val loss of 200 .. 1000
    assert "excluded" in d["reason"]
    assert all(v["checkpoint_step"] < 1200 for v in d["intervals"].values())


def test_divergence_is_read_on_the_raw_weights_when_the_run_keeps_ema():
    recs = records(30, ema=True)
    recs[10]["val_loss_raw"] = math.nan  # the raw weights blew up; their average has not shown it yet
    d = analyze(recs, CFG, FLOW, BUDGET).decision
    assert d["diverged_at"] == 1100 and d["checkpoint_step"] < 1100 and d["curve"]["weights"] == "ema"


def test_no_checkpoint_before_divergence_is_no_decision_with_reason():
    recs = records(10, nan_from=300, ckpt_every=4)
    a = analyze(recs, CFG, FLOW, BUDGET)
    assert a.decision is None
    assert "no usable checkpoint before divergence at step 300" in a.reason


def test_a_knee_before_the_first_checkpoint_waits_for_the_first_one_after_it():
    recs = records(40, ckpt_every=1, first_ckpt=36)
    n, d = first_decision(recs)
    assert d["checkpoint_step"] == 3600 and n == 36 and "none was saved before" in d["reason"]


def test_missing_checkpoints_are_skipped():
    recs = records(40, ckpt_every=1)
    full = analyze(recs, CFG, FLOW, BUDGET).decision
    gone = full["checkpoint"]
    d = analyze(recs, CFG, FLOW, BUDGET, checkpoint_exists=lambda url: url != gone).decision
    assert d["checkpoint_step"] == full["checkpoint_step"] + 100
    assert "missing or incomplete on storage" in d["reason"]


def test_finished_run_without_knee_takes_the_best_checkpoint():
    recs = [{"step": 100 * (i + 1), "val_loss": 1.0 - 0.01 * i, "checkpoint": f"c{i}"} for i in range(12)]
    assert analyze(recs, CFG, FLOW, BUDGET).decision is None  # a straight line: still falling
    d = analyze(recs, CFG, FLOW, BUDGET, finished=True).decision
    assert d["method"] == "best" and d["checkpoint"] == "c11" and d["knee_step"] is None


def test_manual_decision_records_the_operator_checkpoint():
    recs = records(10)
    d = manual_decision(recs, recs[3]["checkpoint"], CFG)
    assert d["method"] == "manual" and d["checkpoint_step"] == 400 and d["knee_step"] is None


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 40),
    nan_at=st.one_of(st.none(), st.integers(0, 39)),
    spike_at=st.one_of(st.none(), st.integers(1, 39)),
    ckpt_every=st.integers(1, 5),
    seed=st.integers(0, 1000),
    finished=st.booleans(),
)
def test_a_divergence_decision_never_uses_a_checkpoint_at_or_after_the_onset(n, nan_at, spike_at, ckpt_every, seed,
                                                                             finished):
    recs = records(n, noise=0.01, seed=seed, ckpt_every=ckpt_every)
    if nan_at is not None and nan_at < n:
        recs[nan_at]["val_loss"] = math.nan
    if spike_at is not None and spike_at < n:
        recs[spike_at]["val_loss"] = 10.0
    a = analyze(recs, ESGFConfig(knee=KneeConfig(min_validations=3, window=3)), FLOW, BUDGET, finished=finished)
    d = a.decision
    if d is None:
        assert a.reason
        return
    assert d["checkpoint"] in {r["checkpoint"] for r in recs if r["checkpoint"]}
    if d["method"] == "knee":  # the knee fired before divergence was seen: nothing after it was looked at
        assert a.divergence is None or a.divergence.seen > a.knee.fired
        return
    if a.divergence is not None:
        assert d["diverged_at"] == a.divergence.step and d["checkpoint_step"] < a.divergence.step
        for r in recs:  # nothing after the first non-finite or spiking validation
            if r["checkpoint"] == d["checkpoint"]:
                assert all(math.isfinite(x["val_loss"]) and x["val_loss"] < 10 for x in recs if x["step"] <= r["step"])
