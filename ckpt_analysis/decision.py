"""The ESGF decision: which pretrain checkpoint the expert tree starts from, and when.

Events, in the order the sidecar sees them as metrics.jsonl grows (knee.py has the rule):
- the knee rule fires: the checkpoint is the earliest one whose smoothed loss is at or below
  the rule's threshold (method "knee"); the pretrain is then stopped (esgf.stop_at_knee);
- divergence is seen first: the checkpoint with the lowest val loss before its onset
  (method "best_before_divergence"); with no checkpoint before the onset there is no decision;
- the run finished without either: its lowest-val-loss checkpoint (method "best").
The first event decides, and `analyze` replays the curve prefix by prefix, so a decision taken
online is the one any later look at the same run computes. It also reports the knee rule on
every log-SNR interval (val_loss_by_interval) and, for the tree's level 1, the pretrain
checkpoint each half would start from under esgf.experts.init = "per_interval".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from linearsr.ckpt_analysis.config import ESGFConfig
from linearsr.ckpt_analysis.knee import Divergence, Knee, RuleCheck, detect_divergence, find_knee, smooth
from linearsr.model.flow import FlowConfig, Interval


@dataclass(frozen=True)
class Curve:
    """The validation curve from metrics.jsonl records (those that carry a val_loss)."""

    steps: list[int]
    val_loss: list[float]  # the weights that ship: EMA when the run keeps it
    val_loss_raw: list[float] | None  # the raw weights' loss (runs with EMA), else None
    train_loss: list[float | None]
    checkpoints: dict[int, str]  # step -> checkpoint URL saved at that step
    by_interval: dict[str, list[float]] = field(default_factory=dict)  # "lo,hi" -> loss per step (nan if absent)

    def __len__(self) -> int:
        return len(self.steps)

    def node_curve(self, node: Interval, flow: FlowConfig) -> list[float] | None:
        """The loss on a union of validation intervals, weighted by their training mass (as the
        trainer weights val_loss); None unless the curve's intervals tile `node` exactly."""
        parts = sorted((Interval.parse(k), k) for k in self.by_interval)
        inside = [(iv, k) for iv, k in parts if node.lo <= iv.lo and iv.hi <= node.hi]
        if not inside or inside[0][0].lo != node.lo or inside[-1][0].hi != node.hi \
                or any(a.hi != b.lo for (a, _), (b, _) in zip(inside, inside[1:])):
            return None
        if len(inside) == 1:
            return self.by_interval[inside[0][1]]
        masses = [flow.mass(iv) for iv, _ in inside]
        return [sum(m * self.by_interval[k][i] for m, (_, k) in zip(masses, inside)) / sum(masses) for i in range(len(self))]


def _num(x) -> float:
    return math.nan if x is None else float(x)


def curve_from_records(records: list[dict]) -> Curve:
    rows = [r for r in records if r.get("val_loss") is not None and r.get("step") is not None]
    rows.sort(key=lambda r: r["step"])
    keys = sorted({k for r in rows for k in (r.get("val_loss_by_interval") or {})}, key=lambda k: Interval.parse(k))
    raw = [r.get("val_loss_raw") for r in rows]
    return Curve(
        steps=[int(r["step"]) for r in rows],
        val_loss=[_num(r["val_loss"]) for r in rows],
        val_loss_raw=[_num(v) for v in raw] if rows and all(v is not None for v in raw) else None,
        train_loss=[None if r.get("train_loss") is None else float(r["train_loss"]) for r in rows],
        checkpoints={int(r["step"]): r["checkpoint"] for r in rows if r.get("checkpoint")},
        by_interval={k: [_num((r.get("val_loss_by_interval") or {}).get(k)) for r in rows] for k in keys},
    )


def _finite_prefix(values: list[float]) -> int:
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), len(values))


@dataclass(frozen=True)
class Analysis:
    """What the curve says now. `decision` is the decision.json content when one is due, else
    None and `reason` says why not yet. `check` holds the rule's numbers on the prefix it fired
    on (or the last one evaluated); `smoothed` is the curve before divergence, smoothed."""

    curve: Curve
    smoothed: list[float]
    knee: Knee | None
    check: RuleCheck | None
    divergence: Divergence | None
    decision: dict | None
    reason: str

    @property
    def knee_step(self) -> int | None:
        return None if self.knee is None else self.curve.steps[self.knee.index]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _pick(curve: Curve, values: list[float], usable: dict[int, str], upto: int, knee: Knee | None,
          before_step: int | None = None) -> tuple[int, str] | None:
    """(checkpoint step, how chosen) among usable checkpoints at validations 0..upto-1 (with a
    knee: up to the validation it fired on), before `before_step`: with a knee the earliest at
    or below its threshold, else the lowest loss."""
    index = {s: i for i, s in enumerate(curve.steps)}
    upto = knee.fired + 1 if knee is not None else upto
    cands = sorted(s for s in usable if index[s] < upto and (before_step is None or s < before_step)
                   and math.isfinite(values[index[s]]))
    if knee is not None:
        below = [s for s in cands if knee.check.smoothed[index[s]] <= knee.check.threshold]
        if below:
            return below[0], "the earliest checkpoint at or below the threshold"
        after = [s for s in usable if index[s] > knee.fired]
        if not cands and after:
            return min(after), "the first checkpoint saved after the rule fired: none was saved before"
    if not cands:
        return None
    return min(cands, key=lambda s: (values[index[s]], s)), "the lowest val loss"


def interval_knees(curve: Curve, cfg: ESGFConfig, flow: FlowConfig, budget: int | None, usable: dict[int, str],
                   upto: int, before_step: int | None) -> dict[str, dict]:
    """The knee rule on each validation interval and each level-1 node of the tree, on the
    validations 0..upto-1: {key: {knee_step, checkpoint_step, checkpoint, method}}."""
    curves = dict(curve.by_interval)
    for node in flow.tree()[1] if flow.bisection_depth >= 1 else []:
        if node.interval.key not in curves and (c := curve.node_curve(node.interval, flow)) is not None:
            curves[node.interval.key] = c
    out = {}
    for key, values in sorted(curves.items(), key=lambda kv: Interval.parse(kv[0])):
        end = min(upto, _finite_prefix(values))
        knee, _ = find_knee(curve.steps[:end], values[:end], cfg.knee, budget)
        picked = _pick(curve, values, usable, end, knee, before_step)
        out[key] = {"knee_step": curve.steps[knee.index] if knee else None,
                    "fired_at": curve.steps[knee.fired] if knee else None,
                    "checkpoint_step": picked[0] if picked else None,
                    "checkpoint": usable[picked[0]] if picked else None,
                    "method": ("knee" if knee else "best") if picked else None}
    return out


def analyze(
    records: list[dict],
    cfg: ESGFConfig,
    flow: FlowConfig,
    budget: int | None,
    finished: bool = False,
    checkpoint_exists: Callable[[str], bool] | None = None,
) -> Analysis:
    """Analyse metrics records. `budget`: the pretrain's last step (run.steps), the horizon of the
    rule's projection. `finished`: the pretrain has ended (decide with what is there).
    `checkpoint_exists`: filter for checkpoints still on storage and complete (None = trust all)."""
    kc, curve = cfg.knee, curve_from_records(records)
    div = detect_divergence(curve.steps, curve.val_loss_raw or curve.val_loss, cfg.divergence, curve.train_loss)
    limit = min(div.seen if div else len(curve), _finite_prefix(curve.val_loss))
    knee, check = find_knee(curve.steps[:limit], curve.val_loss[:limit], kc, budget)
    end = div.index if div and knee is None else limit
    smoothed = smooth(curve.steps[:end], curve.val_loss[:end], kc.window) if end else []

    def result(decision: dict | None, reason: str) -> Analysis:
        return Analysis(curve, smoothed, knee, check, div, decision, reason)

    if not curve:
        return result(None, "metrics.jsonl has no validation yet")
    if knee is None and div is None and not finished:
        return result(None, _why_not_yet(curve, check, cfg, budget))

    usable = {s: url for s, url in curve.checkpoints.items() if checkpoint_exists is None or checkpoint_exists(url)}
    gone = sorted(s for s in curve.checkpoints if s not in usable)
    onset = div.step if div is not None and knee is None else None
    upto = knee.fired + 1 if knee else (div.index if onset is not None else len(curve))
    picked = _pick(curve, curve.val_loss, usable, upto, knee, onset)
    if picked is None:
        where = (f"knee confirmed at step {curve.steps[knee.fired]}, but no complete checkpoint is saved yet" if knee
                 else f"no usable checkpoint before divergence at step {div.step} ({div.detail})" if onset is not None
                 else "no usable checkpoint")
        return result(None, where + (f"; missing or incomplete on storage: steps {gone}" if gone else ""))
    chosen, how = picked

    notes = [f"checkpoint at step {chosen}: {how}"]
    if knee is not None:
        c = knee.check
        method = "knee"
        why = (f"knee at step {curve.steps[knee.index]}, confirmed at step {curve.steps[knee.fired]}: the last {kc.window} "
               f"validations gained {c.recent / max(c.drop, 1e-12):.1%} of the drop so far and the rate projects "
               f"{c.projected / max(c.drop + c.projected, 1e-12):.1%} more by step {budget} "
               f"(tolerance {kc.tolerance:.0%}, {kc.patience} validation(s) in a row)")
        if div is not None:
            notes.append(f"divergence was seen later (onset step {div.step}: {div.detail})")
    elif onset is not None:
        method, why = "best_before_divergence", "no knee before divergence"
        notes.append(f"divergence began at step {div.step} ({div.detail}); checkpoints from step {div.step} on are excluded")
    else:
        method, why = "best", "the run finished without a knee"
    if gone:
        notes.append(f"skipped checkpoints missing or incomplete on storage: steps {gone}")

    finite = [(v, s) for s, v in zip(curve.steps, curve.val_loss) if math.isfinite(v)]
    best_v, best_s = min(finite) if finite else (math.nan, None)
    val = dict(zip(curve.steps, curve.val_loss))
    decision = {
        "knee_step": curve.steps[knee.index] if knee else None,
        "confirmed_at": curve.steps[knee.fired] if knee else (curve.steps[div.seen] if onset is not None else None),
        "checkpoint": usable[chosen],
        "checkpoint_step": chosen,
        "diverged_at": div.step if div else None,
        "divergence": None if div is None else {"kind": div.kind, "step": div.step, "detail": div.detail},
        "method": method,
        "params": cfg.params(),
        "rule": None if knee is None else {
            "budget": budget, "threshold": knee.check.threshold, "drop": knee.check.drop,
            "recent": knee.check.recent, "projected": knee.check.projected, "slope_per_log_step": knee.check.slope},
        "curve": {
            "validations": len(curve),
            "first_step": curve.steps[0],
            "last_step": curve.steps[-1],
            "best_step": best_s,
            "best_val_loss": best_v,
            "val_loss_at_checkpoint": val[chosen],
            "smoothed_at_knee": knee.check.smoothed[knee.index] if knee else None,
            "last_val_loss": curve.val_loss[-1],
            "weights": "ema" if curve.val_loss_raw is not None else "raw",
        },
        "intervals": interval_knees(curve, cfg, flow, budget, usable, upto, onset),
        "run_finished": finished,
        "reason": "; ".join([why] + notes),
        "decided_at": time.time(),
    }
    return result(decision, decision["reason"])


def _why_not_yet(curve: Curve, check: RuleCheck | None, cfg: ESGFConfig, budget: int | None) -> str:
    kc = cfg.knee
    if check is None:
        return f"no knee yet: {len(curve)} validations, need ≥ {kc.min_validations}"
    share = (check.recent + check.projected) / max(check.drop + check.projected, 1e-12)
    return (f"no knee yet at step {curve.steps[check.n - 1]}: the last {kc.window} validations gained "
            f"{check.recent / max(check.drop, 1e-12):.1%} of the drop so far and the rate projects "
            f"{check.projected / max(check.drop + check.projected, 1e-12):.1%} more by step {budget}; "
            f"together {share:.1%} of the projected total drop, the rule fires at ≤ {kc.tolerance:.0%}"
            + (f" ({kc.patience} validations in a row)" if kc.patience > 1 else ""))


def manual_decision(records: list[dict], checkpoint: str, cfg: ESGFConfig, knee_step: int | None = None) -> dict:
    """decision.json for an operator's choice of checkpoint (`linearsr experts --from-checkpoint`)."""
    curve = curve_from_records(records)
    step = next((s for s, url in curve.checkpoints.items() if url.rstrip("/") == checkpoint.rstrip("/")), None)
    return {
        "knee_step": knee_step,
        "confirmed_at": None,
        "checkpoint": checkpoint,
        "checkpoint_step": step,
        "diverged_at": None,
        "divergence": None,
        "method": "manual",
        "params": cfg.params(),
        "rule": None,
        "curve": {"validations": len(curve), "last_step": curve.steps[-1] if curve else None},
        "intervals": {},
        "run_finished": None,
        "reason": "checkpoint chosen by the operator (linearsr experts --from-checkpoint); knee detection skipped",
        "decided_at": time.time(),
    }
