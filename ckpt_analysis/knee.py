"""Knee and divergence detection on a validation-loss curve: pure functions on lists.

Smoothing (see `KneeConfig`): a running median of `window` points (optional) followed by an EMA
with alpha = 2 / (window + 1). The knee uses the zero-phase form (centred median, EMA run
forward then backward) so smoothing does not delay the knee; divergence uses the causal form
(trailing median, forward EMA with bias correction) so a rise is never seen before it happened.

The knee is Kneedle (Satopää et al. 2011, the `kneed` package) on the smoothed curve before any
divergence. Divergence is the first validation that is non-finite, spikes above a multiple of
the best loss so far, or where the smoothed loss stays a set fraction above its minimum.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from linearsr.ckpt_analysis.config import DivergenceConfig, KneeConfig


def _ema_forward(values: Sequence[float], alpha: float, bias_correct: bool) -> list[float]:
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        weight = alpha + (1 - alpha) * weight
        out.append(acc / weight if bias_correct else acc)
    return out


def _ema_zero_phase(values: Sequence[float], alpha: float) -> list[float]:
    fwd = _ema_forward(values, alpha, bias_correct=True)
    return _ema_forward(fwd[::-1], alpha, bias_correct=True)[::-1]


def _running_median(values: Sequence[float], window: int, centred: bool) -> list[float]:
    n, out = len(values), []
    for i in range(n):
        if centred:
            lo, hi = max(0, i - window // 2), min(n, i + window // 2 + 1)
        else:
            lo, hi = max(0, i - window + 1), i + 1
        out.append(statistics.median(values[lo:hi]))
    return out


def smooth(values: Sequence[float], method: str = "median_ema", window: int = 5, causal: bool = False) -> list[float]:
    """Smoothed copy of `values` (finite floats), same length.
    method: "ema" | "median_ema" | "none"; causal=True uses only past points for each value."""
    vals = [float(v) for v in values]
    if method not in ("ema", "median_ema", "none"):
        raise ValueError(f"smoothing method {method!r} is unknown; choose ema, median_ema or none")
    if method == "none" or window <= 1 or len(vals) < 2:
        return vals
    alpha = 2.0 / (window + 1)
    if causal:
        if method == "median_ema":
            vals = _running_median(vals, window, centred=False)
        return _ema_forward(vals, alpha, bias_correct=True)
    # odd extension at both ends (as scipy's filtfilt): keeps the slope there instead of
    # pulling the steep first validations toward the later, lower ones
    pad = min(2 * window, len(vals) - 1)
    head = [2 * vals[0] - v for v in vals[pad:0:-1]]
    tail = [2 * vals[-1] - v for v in vals[-2:-pad - 2:-1]]
    ext = head + vals + tail
    if method == "median_ema":
        ext = _running_median(ext, window, centred=True)
    return _ema_zero_phase(ext, alpha)[pad:pad + len(vals)]


def find_knee(steps: Sequence[int], smoothed: Sequence[float], cfg: KneeConfig) -> int | None:
    """Index of the Kneedle knee of the (smoothed) curve, or None when it has none (too short,
    flat, or no bend in the configured direction)."""
    from kneed import KneeLocator

    if len(steps) < 3 or max(smoothed) - min(smoothed) <= 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kneed warns "No knee/elbow found"; None says the same
        loc = KneeLocator(list(steps), list(smoothed), S=cfg.sensitivity, curve=cfg.curve,
                          direction=cfg.direction, interp_method=cfg.interp_method, online=cfg.online)
    if loc.knee is None:
        return None
    return list(steps).index(loc.knee)


@dataclass(frozen=True)
class Divergence:
    """Where divergence began: `index` into the validations, its `step`, and why."""

    index: int
    step: int
    kind: str  # "nonfinite" | "spike" | "rise"
    detail: str


def detect_divergence(
    steps: Sequence[int],
    val_loss: Sequence[float],
    cfg: DivergenceConfig,
    train_loss: Sequence[float | None] | None = None,
    smoothing: str = "median_ema",
    window: int = 5,
) -> Divergence | None:
    """The earliest divergence onset, or None. `train_loss` (same length, None where absent) adds
    the non-finite check on the training loss."""
    for i, v in enumerate(val_loss):
        t = train_loss[i] if train_loss is not None else None
        if not math.isfinite(v) or (t is not None and not math.isfinite(t)):
            which = "val loss" if not math.isfinite(v) else "train loss"
            bad = v if not math.isfinite(v) else t
            first_bad = Divergence(i, steps[i], "nonfinite", f"{which} is {bad} at step {steps[i]}")
            break
    else:
        first_bad = None
    end = first_bad.index if first_bad else len(val_loss)
    finite = [float(v) for v in val_loss[:end]]

    found = [d for d in (first_bad, _spike(steps, finite, cfg), _rise(steps, finite, cfg, smoothing, window)) if d]
    return min(found, key=lambda d: d.index) if found else None


def _spike(steps: Sequence[int], finite: list[float], cfg: DivergenceConfig) -> Divergence | None:
    best = math.inf
    for i, v in enumerate(finite):
        if i > 0 and v > cfg.spike_factor * best:
            return Divergence(i, steps[i], "spike",
                              f"val loss {v:.4g} at step {steps[i]} is {v / best:.2f}x the best so far ({best:.4g})")
        best = min(best, v)
    return None


def _rise(steps: Sequence[int], finite: list[float], cfg: DivergenceConfig, smoothing: str, window: int) -> Divergence | None:
    run, running_min = 0, math.inf
    for i, v in enumerate(smooth(finite, smoothing, window, causal=True)):
        running_min = min(running_min, v)
        run = run + 1 if v >= (1 + cfg.rise_fraction) * running_min else 0
        if run >= cfg.window:
            # the causal smoothing lags: walk back over the raw values that were already clearly
            # above the minimum, so the onset is where the climb began, not where it was seen
            j = i - cfg.window + 1
            while j > 0 and finite[j - 1] >= (1 + cfg.rise_fraction / 2) * running_min:
                j -= 1
            return Divergence(j, steps[j], "rise",
                              f"smoothed val loss rose >= {1 + cfg.rise_fraction:.2f}x its minimum ({running_min:.4g}) "
                              f"and stayed there for {cfg.window} validations; the climb began at step {steps[j]}")
    return None


def still_falling(smoothed: Sequence[float], cfg: KneeConfig) -> float | None:
    """If the curve has not flattened yet, the fraction of its total drop lost over the last
    `confirm_validations` validations (> plateau_tolerance); None when it has flattened."""
    k = cfg.confirm_validations
    if len(smoothed) <= k:
        return math.inf
    total = smoothed[0] - min(smoothed)
    if total <= 0:
        return None
    recent = (smoothed[-1 - k] - smoothed[-1]) / total
    return recent if recent > cfg.plateau_tolerance else None
