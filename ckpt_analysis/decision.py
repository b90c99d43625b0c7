"""The ESGF decision: which pretrain checkpoint every further fine-tune starts from.

Rule: the checkpoint at, or nearest before, the Kneedle knee of the smoothed validation loss,
never one saved at or after the step where divergence began. Without a knee (the run diverged
or finished before one appeared) it is the checkpoint with the lowest validation loss before
divergence. On a run still training the decision is taken once and only when it is final:
the knee is confirmed (enough validations after it, on a plateau), or divergence was seen, or
the run finished. Otherwise `analyze` says why there is no decision yet.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from linearsr.ckpt_analysis.config import ESGFConfig
from linearsr.ckpt_analysis.knee import Divergence, detect_divergence, find_knee, smooth, still_falling


@dataclass(frozen=True)
class Curve:
    """The validation curve from metrics.jsonl records (those that carry a val_loss)."""

    steps: list[int]
    val_loss: list[float]
    train_loss: list[float | None]
    checkpoints: dict[int, str]  # step -> checkpoint URL saved at that step
    by_interval: dict[str, list[float]] = field(default_factory=dict)  # "lo,hi" -> loss per step (nan if absent)

    def __len__(self) -> int:
        return len(self.steps)


def _num(x) -> float:
    return math.nan if x is None else float(x)


def curve_from_records(records: list[dict]) -> Curve:
    rows = [r for r in records if r.get("val_loss") is not None and r.get("step") is not None]
    rows.sort(key=lambda r: r["step"])
    keys = sorted({k for r in rows for k in (r.get("val_loss_by_interval") or {})},
                  key=lambda k: float(k.split(",")[0]))
    return Curve(
        steps=[int(r["step"]) for r in rows],
        val_loss=[_num(r["val_loss"]) for r in rows],
        train_loss=[None if r.get("train_loss") is None else float(r["train_loss"]) for r in rows],
        checkpoints={int(r["step"]): r["checkpoint"] for r in rows if r.get("checkpoint")},
        by_interval={k: [_num((r.get("val_loss_by_interval") or {}).get(k)) for r in rows] for k in keys},
    )


@dataclass(frozen=True)
class Analysis:
    """What the curve says now. `decision` is the decision.json content when one is due, else
    None and `reason` says why not yet."""

    curve: Curve
    smoothed: list[float]  # zero-phase smoothed val loss of the validations before divergence
    knee_index: int | None
    divergence: Divergence | None
    decision: dict | None
    reason: str

    @property
    def knee_step(self) -> int | None:
        return None if self.knee_index is None else self.curve.steps[self.knee_index]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def analyze(
    records: list[dict],
    cfg: ESGFConfig,
    finished: bool = False,
    checkpoint_exists: Callable[[str], bool] | None = None,
) -> Analysis:
    """Analyse metrics records. `finished`: the pretrain run has ended (decide with what is there).
    `checkpoint_exists`: filter for checkpoints that are still on storage and complete (None = trust all)."""
    kc, curve = cfg.knee, curve_from_records(records)
    div = detect_divergence(curve.steps, curve.val_loss, cfg.divergence, curve.train_loss, kc.smoothing, kc.window)
    end = div.index if div else len(curve)
    steps, smoothed = curve.steps[:end], smooth(curve.val_loss[:end], kc.smoothing, kc.window)
    knee = find_knee(steps, smoothed, kc) if end >= kc.min_validations else None

    def result(decision: dict | None, reason: str) -> Analysis:
        return Analysis(curve, smoothed, knee, div, decision, reason)

    if not curve:
        return result(None, "metrics.jsonl has no validation yet")
    if div is None and not finished:
        if end < kc.min_validations:
            return result(None, f"no knee yet: {end} validations, need ≥ {kc.min_validations}")
        if knee is None:
            return result(None, f"no knee yet: the curve has no bend after {end} validations (Kneedle S={kc.sensitivity:g})")
        after = end - 1 - knee
        if after < kc.confirm_validations:
            return result(None, f"knee not confirmed yet: the candidate at step {steps[knee]} has {after} "
                                f"validation(s) after it, need ≥ {kc.confirm_validations}")
        falling = still_falling(smoothed, kc)
        if falling is not None:
            return result(None, f"knee not confirmed yet: the curve is still falling ({falling:.0%} of its total drop "
                                f"in the last {kc.confirm_validations} validations; candidate at step {steps[knee]})")

    usable = {s: url for s, url in curve.checkpoints.items()
              if (div is None or s < div.step) and (checkpoint_exists is None or checkpoint_exists(url))}
    gone = sorted(s for s in curve.checkpoints if s not in usable and (div is None or s < div.step))
    if not usable:
        where = f" before divergence at step {div.step} ({div.detail})" if div else ""
        return result(None, f"no usable checkpoint{where}"
                            + (f"; missing or incomplete on storage: steps {gone}" if gone else ""))

    notes = []
    if knee is not None:
        knee_step = steps[knee]
        before = [s for s in usable if s <= knee_step]
        chosen = max(before) if before else min(usable)
        method = "kneedle"
        why = f"knee at step {knee_step} (Kneedle S={kc.sensitivity:g} on {kc.smoothing}-smoothed val loss)"
        notes.append(f"checkpoint at step {chosen}, " + ("the nearest at or before the knee" if before
                     else "the first after it: none was saved at or before the knee"))
    else:
        knee_step = None
        val = dict(zip(curve.steps, curve.val_loss))
        chosen = min(usable, key=lambda s: (val[s], s))
        method = "best_before_divergence" if div else "best"
        why = ("no knee before divergence" if div else "the run finished without a knee")
        notes.append(f"best checkpoint: step {chosen} (val loss {_fmt(val[chosen])})")
    if div:
        notes.append(f"divergence began at step {div.step} ({div.detail}); checkpoints from step {div.step} on are excluded")
    elif finished and method == "kneedle":
        notes.append("the run finished")
    if gone:
        notes.append(f"skipped checkpoints missing or incomplete on storage: steps {gone}")

    finite = [(v, s) for s, v in zip(curve.steps, curve.val_loss) if math.isfinite(v)]
    best_v, best_s = min(finite) if finite else (math.nan, None)
    decision = {
        "knee_step": knee_step,
        "checkpoint": usable[chosen],
        "checkpoint_step": chosen,
        "diverged_at": div.step if div else None,
        "divergence": None if div is None else {"kind": div.kind, "step": div.step, "detail": div.detail},
        "method": method,
        "params": cfg.params(),
        "curve": {
            "validations": len(curve),
            "first_step": curve.steps[0],
            "last_step": curve.steps[-1],
            "best_step": best_s,
            "best_val_loss": best_v,
            "val_loss_at_knee": curve.val_loss[knee] if knee is not None else None,
            "smoothed_at_knee": smoothed[knee] if knee is not None else None,
            "last_val_loss": curve.val_loss[-1],
        },
        "run_finished": finished,
        "reason": "; ".join([why] + notes),
        "decided_at": time.time(),
    }
    return result(decision, decision["reason"])


def manual_decision(records: list[dict], checkpoint: str, cfg: ESGFConfig, knee_step: int | None = None) -> dict:
    """decision.json for an operator's choice of checkpoint (`linearsr experts --from-checkpoint`)."""
    curve = curve_from_records(records)
    step = next((s for s, url in curve.checkpoints.items() if url.rstrip("/") == checkpoint.rstrip("/")), None)
    return {
        "knee_step": knee_step,
        "checkpoint": checkpoint,
        "checkpoint_step": step,
        "diverged_at": None,
        "divergence": None,
        "method": "manual",
        "params": cfg.params(),
        "curve": {"validations": len(curve), "last_step": curve.steps[-1] if curve else None},
        "run_finished": None,
        "reason": "checkpoint chosen by the operator (linearsr experts --from-checkpoint); knee detection skipped",
        "decided_at": time.time(),
    }
