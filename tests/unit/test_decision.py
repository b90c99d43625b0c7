"""The ESGF decision: the checkpoint at or before the knee, never at or after divergence, and
a clear "no decision yet" while the run is still training."""

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from linearsr.ckpt_analysis.config import ESGFConfig, KneeConfig
from linearsr.ckpt_analysis.decision import analyze, manual_decision

CFG = ESGFConfig()


def records(n=40, noise=0.005, seed=0, ckpt_every=2, nan_from=None, every=100, first_ckpt=1):
    """metrics.jsonl records of a decaying curve; a checkpoint every `ckpt_every` validations."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        step = every * (i + 1)
        v = 0.5 * math.exp(-step / 600) + 0.1 + rng.gauss(0, noise)
        if nan_from is not None and step >= nan_from:
            v = math.nan
        ckpt = f"runs/x/checkpoints/checkpoint_{step:06d}" if (i + 1) % ckpt_every == 0 and i + 1 >= first_ckpt else None
        out.append({"step": step, "val_loss": v, "train_loss": v, "checkpoint": ckpt,
                    "val_loss_by_interval": {"-inf,0": 2 * v, "0,inf": v / 2}})
    return out


def test_too_short_says_how_many_validations_are_missing():
    a = analyze(records(6), CFG)
    assert a.decision is None
    assert a.reason == "no knee yet: 6 validations, need ≥ 8"


def test_knee_not_confirmed_while_the_curve_still_falls():
    a = analyze(records(14, noise=0.0), CFG)
    assert a.decision is None
    assert a.reason.startswith("knee not confirmed yet")
    assert "still falling" in a.reason or "validation(s) after it" in a.reason


def test_confirmed_knee_picks_the_nearest_checkpoint_at_or_before_it():
    a = analyze(records(40), CFG)
    d = a.decision
    assert d is not None and d["method"] == "kneedle"
    ckpt_steps = [r["step"] for r in records(40) if r["checkpoint"]]
    assert d["checkpoint_step"] == max(s for s in ckpt_steps if s <= d["knee_step"])
    assert d["checkpoint"].endswith(f"checkpoint_{d['checkpoint_step']:06d}")
    assert d["diverged_at"] is None and d["params"]["knee"]["sensitivity"] == 1.0
    assert d["curve"]["validations"] == 40 and "knee at step" in d["reason"]


def test_nan_divergence_decides_at_once_and_excludes_later_checkpoints():
    recs = records(30, nan_from=2400)
    a = analyze(recs, CFG)  # run still "training": divergence is reason enough to decide
    d = a.decision
    assert d is not None and d["diverged_at"] == 2400
    assert d["checkpoint_step"] < 2400 and d["checkpoint_step"] <= d["knee_step"]
    assert "excluded" in d["reason"]


def test_divergence_before_any_knee_picks_the_best_checkpoint_before_it():
    recs = records(8, noise=0.0, nan_from=700)  # still falling steeply when it blows up
    d = analyze(recs, CFG).decision
    assert d["method"] == "best_before_divergence"
    assert d["checkpoint_step"] == 600  # the lowest val loss among checkpoints 200, 400, 600


def test_no_checkpoint_before_divergence_is_no_decision_with_reason():
    recs = records(10, nan_from=300, ckpt_every=4)
    a = analyze(recs, CFG)
    assert a.decision is None
    assert "no usable checkpoint before divergence at step 300" in a.reason


def test_knee_before_the_first_checkpoint_takes_the_first_after_it():
    d = analyze(records(40, ckpt_every=1, first_ckpt=20), CFG).decision
    assert d["checkpoint_step"] == 2000 and "none was saved at or before the knee" in d["reason"]


def test_missing_checkpoints_are_skipped():
    recs = records(40)
    full = analyze(recs, CFG).decision
    gone = full["checkpoint"]
    d = analyze(recs, CFG, checkpoint_exists=lambda url: url != gone).decision
    assert d["checkpoint_step"] == full["checkpoint_step"] - 200
    assert "missing or incomplete on storage" in d["reason"]


def test_finished_run_without_knee_takes_the_best_checkpoint():
    recs = [{"step": 100 * (i + 1), "val_loss": 1.0 - 0.01 * i, "checkpoint": f"c{i}"} for i in range(12)]
    assert analyze(recs, CFG).decision is None  # a straight line: no knee, still falling
    d = analyze(recs, CFG, finished=True).decision
    assert d["method"] == "best" and d["checkpoint"] == "c11"


def test_manual_decision_records_the_operator_checkpoint():
    recs = records(10)
    d = manual_decision(recs, recs[3]["checkpoint"], CFG)
    assert d["method"] == "manual" and d["checkpoint_step"] == 400 and d["knee_step"] is None


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(3, 40),
    nan_at=st.one_of(st.none(), st.integers(0, 39)),
    spike_at=st.one_of(st.none(), st.integers(1, 39)),
    ckpt_every=st.integers(1, 5),
    seed=st.integers(0, 1000),
    finished=st.booleans(),
)
def test_a_decision_never_uses_a_checkpoint_at_or_after_divergence(n, nan_at, spike_at, ckpt_every, seed, finished):
    recs = records(n, noise=0.01, seed=seed, ckpt_every=ckpt_every)
    if nan_at is not None and nan_at < n:
        recs[nan_at]["val_loss"] = math.nan
    if spike_at is not None and spike_at < n:
        recs[spike_at]["val_loss"] = 10.0
    a = analyze(recs, ESGFConfig(knee=KneeConfig(min_validations=3)), finished=finished)
    d = a.decision
    if d is None:
        assert a.reason
        return
    assert d["checkpoint"] in {r["checkpoint"] for r in recs if r["checkpoint"]}
    if a.divergence is not None:
        assert d["diverged_at"] == a.divergence.step
        assert d["checkpoint_step"] < a.divergence.step
    for r in recs:  # nothing after the first non-finite or spiking validation
        if r["checkpoint"] == d["checkpoint"]:
            assert all(math.isfinite(x["val_loss"]) and x["val_loss"] < 10 for x in recs if x["step"] <= r["step"])
