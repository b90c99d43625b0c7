"""The knee rule and divergence detection on a validation-loss curve: pure functions on lists.

Smoothing without lag. Each validation's smoothed loss is a least-squares line in log(step) over
`window` validations, evaluated at that validation: centred inside the curve, the last `window`
points at its end (as Savitzky-Golay filters end). A line has no lag: on a curve that is
straight in log(step) the smoothed curve is the curve itself, at the last point too. A centred
median of 3 runs first, so one wild validation does not bend the line.

The rule, evaluated on every prefix of the curve as the sidecar sees it grow. At the prefix's
last validation n (step x_n), with the budget's last step X (run.steps):

    slope g      the smoothed line's slope per unit log(step) there, minus `confidence` standard
                 errors (from the curve's own scatter around its smoothed values): the loss may
                 well be falling this fast
    recent I     = -g * log(x_n / x_{n-window+1})       the drop over the last `window` validations
    projected R  = -g * log(X / x_n)                    the drop still to come if the loss kept
                 falling at that rate in log(step) to the end of the budget; losses flatten in
                 log(step) (they are convex there), so R bounds what is left
    drop D       = max - min of the smoothed prefix     the drop so far; D + R the projected total

It holds when I + R <= tolerance * (D + R). It fires when it has held on `patience` prefixes in
a row (and the prefix has >= min_validations points). The knee is then the earliest validation
whose smoothed loss is <= threshold = min(smoothed) - R + tolerance * (D + R): the earliest point
that leaves at most `tolerance` of the projected total drop unused.

Prefix stability: the decision is a function of the prefix on which the rule first fired, and
`find_knee` replays the prefixes in order, so every longer prefix of the same curve gives the
same knee. Since I <= I + R <= tolerance * (D + R) implies I <= tolerance * D, no decision is
taken while the last `window` validations still improve by more than `tolerance` of the drop.

Divergence is the first validation that is non-finite (val or train loss), spikes above a
multiple of the best loss so far, or where the causally smoothed loss (trailing median of 3)
stays a set fraction above its minimum; each test uses only the past, so it is prefix-stable too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from linearsr.ckpt_analysis.config import DivergenceConfig, KneeConfig


def despike(values: Sequence[float]) -> np.ndarray:
    """Centred median of 3; the two end points unchanged (no future is assumed)."""
    v = np.asarray(values, dtype=np.float64)
    out = v.copy()
    if len(v) > 2:
        out[1:-1] = np.median(np.stack([v[:-2], v[1:-1], v[2:]]), axis=0)
    return out


def _lines(u: np.ndarray, y: np.ndarray, lo: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares y = a + g u over u[lo_i : lo_i + window] for each start lo_i: (a, g, sum of
    squared deviations of u), from running sums."""
    def window_sum(x):
        c = np.concatenate([[0.0], np.cumsum(x)])
        return c[lo + window] - c[lo]

    su, sy, suu, suy = (window_sum(x) for x in (u, y, u * u, u * y))
    sxx = suu - su * su / window
    g = np.where(sxx > 1e-12, (suy - su * sy / window) / np.where(sxx > 1e-12, sxx, 1.0), 0.0)
    return (sy - g * su) / window, g, sxx


def _starts(n: int, window: int) -> np.ndarray:
    i = np.arange(n)
    return np.minimum(np.maximum(0, i - window // 2), max(0, n - window))


def smooth(steps: Sequence[int], values: Sequence[float], window: int) -> list[float]:
    """The smoothed curve (same length): despike, then a line in log(step) over `window`
    validations around each point (the first / last `window` at the ends)."""
    if not len(values):
        return []
    u, y = np.log(np.asarray(steps, dtype=np.float64)), despike(values)
    window = min(window, len(u))
    a, g, _ = _lines(u, y, _starts(len(u), window), window)
    return (a + g * u).tolist()


@dataclass(frozen=True)
class RuleCheck:
    """The rule's numbers on one prefix (see the module docstring)."""

    n: int  # validations in the prefix
    smoothed: list[float]
    slope: float  # per unit log(step), minus `confidence` standard errors; < 0 while the loss may fall
    recent: float  # I
    projected: float  # R
    drop: float  # D
    allowed: float  # tolerance * (D + R)

    @property
    def holds(self) -> bool:
        return self.recent + self.projected <= self.allowed

    @property
    def threshold(self) -> float:
        """The knee is the first validation whose smoothed loss is at or below this."""
        return min(self.smoothed) - self.projected + self.allowed


def check_prefix(steps: Sequence[int], values: Sequence[float], cfg: KneeConfig, budget: int | None) -> RuleCheck:
    """The rule on this prefix (every point of it finite). budget: the run's last step (None:
    no projection, the rule looks at the recent drop only)."""
    w = cfg.window
    s = smooth(steps, values, w)
    u, y = np.log(np.asarray(steps[-w:], dtype=np.float64)), despike(values)
    _, g, sxx = (float(x[0]) for x in _lines(u, y[-w:], np.array([0]), w))
    scatter = 1.4826 * float(np.median(np.abs(y - np.asarray(s))))
    if sxx > 0:  # the upper end of the falling rate: the slope's standard error, as the curve's scatter says
        g -= cfg.confidence * scatter / math.sqrt(sxx)
    rate = max(0.0, -g)
    projected = rate * max(0.0, math.log(budget / steps[-1])) if budget else 0.0
    drop = max(s) - min(s)
    return RuleCheck(len(values), s, g, rate * float(u[-1] - u[0]), projected, drop, cfg.tolerance * (drop + projected))


@dataclass(frozen=True)
class Knee:
    """A fired rule: `fired` is the index of the last validation of the prefix it fired on,
    `index` the knee (into the same validations), `check` the rule's numbers on that prefix."""

    index: int
    fired: int
    check: RuleCheck


def find_knee(steps: Sequence[int], values: Sequence[float], cfg: KneeConfig,
              budget: int | None) -> tuple[Knee | None, RuleCheck | None]:
    """Replay the rule on every prefix in order: (the knee of the first prefix it fires on, or
    None; the rule's numbers on the last prefix evaluated, None when the curve is too short).
    `values` must be finite (cut the curve at divergence first)."""
    run, check = 0, None
    for n in range(cfg.min_validations, len(values) + 1):  # min_validations >= window >= 3
        check = check_prefix(steps[:n], values[:n], cfg, budget)
        run = run + 1 if check.holds else 0
        if run >= cfg.patience:
            index = next(i for i, v in enumerate(check.smoothed) if v <= check.threshold)
            return Knee(index, n - 1, check), check
    return None, check


@dataclass(frozen=True)
class Divergence:
    """Where divergence began: `index` into the validations, its `step`, and why; `seen` is the
    index of the validation at which it became detectable."""

    index: int
    step: int
    kind: str  # "nonfinite" | "spike" | "rise"
    detail: str
    seen: int


def detect_divergence(
    steps: Sequence[int],
    val_loss: Sequence[float],
    cfg: DivergenceConfig,
    train_loss: Sequence[float | None] | None = None,
) -> Divergence | None:
    """The earliest divergence onset, or None. `train_loss` (same length, None where absent) adds
    the non-finite check on the training loss."""
    for i, v in enumerate(val_loss):
        t = train_loss[i] if train_loss is not None else None
        if not math.isfinite(v) or (t is not None and not math.isfinite(t)):
            which = "val loss" if not math.isfinite(v) else "train loss"
            bad = v if not math.isfinite(v) else t
            first_bad = Divergence(i, steps[i], "nonfinite", f"{which} is {bad} at step {steps[i]}", i)
            break
    else:
        first_bad = None
    end = first_bad.index if first_bad else len(val_loss)
    finite = [float(v) for v in val_loss[:end]]

    found = [d for d in (first_bad, _spike(steps, finite, cfg), _rise(steps, finite, cfg)) if d]
    return min(found, key=lambda d: d.seen) if found else None


def _spike(steps: Sequence[int], finite: list[float], cfg: DivergenceConfig) -> Divergence | None:
    best = math.inf
    for i, v in enumerate(finite):
        if i > 0 and v > cfg.spike_factor * best:
            return Divergence(i, steps[i], "spike",
                              f"val loss {v:.4g} at step {steps[i]} is {v / best:.2f}x the best so far ({best:.4g})", i)
        best = min(best, v)
    return None


def _rise(steps: Sequence[int], finite: list[float], cfg: DivergenceConfig) -> Divergence | None:
    run, running_min = 0, math.inf
    trailing = [statistics.median(finite[max(0, i - 2):i + 1]) for i in range(len(finite))]
    for i, v in enumerate(trailing):
        running_min = min(running_min, v)
        run = run + 1 if v >= (1 + cfg.rise_fraction) * running_min else 0
        if run >= cfg.window:
            # the trailing median lags: walk back over the raw values that were already clearly
            # above the minimum, so the onset is where the climb began, not where it was seen
            j = i - cfg.window + 1
            while j > 0 and finite[j - 1] >= (1 + cfg.rise_fraction / 2) * running_min:
                j -= 1
            return Divergence(j, steps[j], "rise",
                              f"smoothed val loss rose >= {1 + cfg.rise_fraction:.2f}x its minimum ({running_min:.4g}) "
                              f"and stayed there for {cfg.window} validations; the climb began at step {steps[j]}", i)
    return None
