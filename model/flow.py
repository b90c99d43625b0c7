"""Flow matching and log-SNR: the one place that defines t <-> lambda, intervals and bisection.

Conventions (rectified flow, as in SD3 / SANA):
    x_t = (1 - t) * x0 + t * eps,      t in [0, 1], t = 1 is pure noise
    v   = eps - x0                      (what the network predicts)
    lambda(t) = 2 * ln((1 - t) / t)     (log signal-to-noise ratio; -inf at t = 1)

The training t is logit-normal with an SD3-style shift. Because lambda = -2 * logit(t),
a logit-normal t is a *normal* lambda: lambda ~ N(-2*mean - 2*ln(shift), (2*std)^2).
That makes "draw t only inside a lambda interval" an exact truncated-normal draw.
A share of every batch sits at t = 1 exactly (FlowConfig.t1_fraction): the 1-NFE sampler's input.

Every stage (trainer, validator, sidecar, experts, sampler) imports these definitions;
nothing else computes log-SNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

INF = math.inf


def lambda_of_t(t: torch.Tensor | float) -> torch.Tensor | float:
    """log-SNR of flow time t: 2 ln((1-t)/t). t=1 -> -inf, t=0 -> +inf."""
    if isinstance(t, torch.Tensor):
        t64 = t.double()
        return (2.0 * (torch.log1p(-t64) - torch.log(t64))).to(t.dtype if t.is_floating_point() else torch.float64)
    if t <= 0.0:
        return INF
    if t >= 1.0:
        return -INF
    return 2.0 * (math.log1p(-t) - math.log(t))


def t_of_lambda(lam: torch.Tensor | float) -> torch.Tensor | float:
    """Inverse of lambda_of_t: t = sigmoid(-lambda / 2)."""
    if isinstance(lam, torch.Tensor):
        return torch.sigmoid(-0.5 * lam)
    if lam == INF:
        return 0.0
    if lam == -INF:
        return 1.0
    return 1.0 / (1.0 + math.exp(0.5 * lam))


def format_bound(x: float) -> str:
    """A λ bound as text: '-inf', 'inf' or the shortest exact float ('-3.0' -> '-3')."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"


def parse_bound(s: str) -> float:
    s = s.strip().lower()
    if s in ("inf", "+inf"):
        return INF
    if s == "-inf":
        return -INF
    return float(s)


@dataclass(frozen=True, order=True)
class Interval:
    """A half-open log-SNR interval [lo, hi). Bounds may be +-inf; an interval whose hi is
    +inf also contains +inf (t = 0), so a partition ending at +inf covers every t in [0, 1]."""

    lo: float
    hi: float

    def __post_init__(self):
        if math.isnan(self.lo) or math.isnan(self.hi) or not self.lo < self.hi:
            raise ValueError(f"log-SNR interval needs lo < hi, got [{self.lo}, {self.hi})")

    def contains(self, lam: float) -> bool:
        return (self.lo <= lam < self.hi) or (lam == self.hi == INF)

    @property
    def key(self) -> str:
        """The interval as text, 'lo,hi': the key used in metrics.jsonl and on the CLI."""
        return f"{format_bound(self.lo)},{format_bound(self.hi)}"

    @property
    def t_range(self) -> tuple[float, float]:
        """(t_min, t_max): t shrinks as lambda grows, so hi maps to t_min."""
        return t_of_lambda(self.hi), t_of_lambda(self.lo)

    @classmethod
    def parse(cls, text: str) -> "Interval":
        """Parse 'lo,hi' (e.g. '-inf,-3' or '0,3'); a one-sentence ValueError otherwise."""
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            lo, hi = parse_bound(parts[0]), parse_bound(parts[1])
        except ValueError:
            raise ValueError(
                f"log-SNR interval {text!r} is not 'LO,HI' (two numbers or -inf/inf, e.g. '-3,0')"
            ) from None
        return cls(lo, hi)

    def __str__(self) -> str:
        return f"[{format_bound(self.lo)}, {format_bound(self.hi)})"


FULL_RANGE = Interval(-INF, INF)


def bisect(lambda_min: float, lambda_max: float, depth: int) -> list[Interval]:
    """Hierarchical bisection of log-SNR: split [lambda_min, lambda_max] in halves `depth`
    times (depth d -> 2**d contiguous intervals, ordered from noisiest to cleanest).
    The outermost intervals own the tails (-inf and +inf), so the partition covers every t.
    Interval i at depth d has parent i // 2 at depth d - 1."""
    if depth < 0:
        raise ValueError(f"bisection depth must be >= 0, got {depth}")
    if not (math.isfinite(lambda_min) and math.isfinite(lambda_max) and lambda_min < lambda_max):
        raise ValueError(f"bisection range needs finite lambda_min < lambda_max, got [{lambda_min}, {lambda_max}]")
    edges = [lambda_min, lambda_max]
    for _ in range(depth):
        edges = [x for a, b in zip(edges[:-1], edges[1:]) for x in (a, (a + b) / 2)] + [edges[-1]]
    edges[0], edges[-1] = -INF, INF
    return [Interval(a, b) for a, b in zip(edges[:-1], edges[1:])]


def find_interval(intervals: list[Interval], lam: float) -> int:
    """Index of the interval that owns lambda (intervals must be contiguous)."""
    for i, iv in enumerate(intervals):
        if iv.contains(lam):
            return i
    raise ValueError(f"log-SNR {lam} lies outside every interval {[str(i) for i in intervals]}")


def check_partition(intervals: list[Interval]) -> None:
    """Raise ValueError unless the intervals are sorted, contiguous and cover (-inf, inf)."""
    if not intervals:
        raise ValueError("an expert partition needs at least one log-SNR interval")
    if intervals[0].lo != -INF or intervals[-1].hi != INF:
        raise ValueError(
            f"expert intervals must cover all log-SNR values: they span {intervals[0].lo} .. {intervals[-1].hi}, need -inf .. inf"
        )
    for a, b in zip(intervals[:-1], intervals[1:]):
        if a.hi != b.lo:
            raise ValueError(f"expert intervals {a} and {b} leave a gap or overlap")


SPLITS = ("mass", "lambda", "fixed")


@dataclass(frozen=True)
class Node:
    """One node of the bisection tree. Level k holds 2**k nodes, index 0 the noisiest; node (k, i)
    is split into (k + 1, 2i) and (k + 1, 2i + 1), and its parent is (k - 1, i // 2). Level 0 is
    the full range, the deepest level the leaves (the experts of the bundle)."""

    level: int
    index: int
    interval: Interval

    @property
    def id(self) -> str:
        return f"L{self.level}-{self.index}"

    @property
    def parent_id(self) -> str | None:
        return None if self.level == 0 else f"L{self.level - 1}-{self.index // 2}"


def tree_levels(edges: list[float]) -> list[list[Node]]:
    """The bisection tree over sorted interior leaf boundaries (2**d - 1 of them): levels 0..d,
    each a partition of (-inf, inf) whose boundaries are a subset of the next level's."""
    depth = int(math.log2(len(edges) + 1))
    assert len(edges) == 2**depth - 1 and list(edges) == sorted(set(edges)), edges
    bounds = [-INF, *edges, INF]
    return [[Node(k, i, Interval(bounds[i << (depth - k)], bounds[(i + 1) << (depth - k)])) for i in range(2**k)]
            for k in range(depth + 1)]


def shifted(t: float, shift: float) -> float:
    """The SD3 time shift t -> shift*t / (1 + (shift - 1)*t): logit(t) moves by ln(shift), the same
    map that FlowConfig.shift applies to the training distribution."""
    return shift * t / (1 + (shift - 1) * t)


def sampling_times(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 sampler times from 1 down to 0: the even grid through the training shift, so a
    multi-step sample spends its steps where training put its samples (shift > 1: more at high noise)."""
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    return [shifted(1.0 - i / steps, shift) for i in range(steps + 1)]


def covering_steps(intervals: list[Interval], shift: float = 1.0, at_least: int = 2, at_most: int = 256) -> int:
    """The smallest number of Euler steps >= at_least whose sampler times visit every interval
    (each leaf expert runs at least once); ValueError when none up to at_most does."""
    for n in range(max(1, at_least), at_most + 1):
        hit = {find_interval(intervals, lambda_of_t(t)) for t in sampling_times(n, shift)[:-1]}
        if len(hit) == len(intervals):
            return n
    raise ValueError(f"no sampling grid of up to {at_most} steps (shift {shift:g}) visits every interval of "
                     f"{[str(iv) for iv in intervals]}; an interval is too narrow")


@dataclass(frozen=True)
class FlowConfig:
    """Training-time distribution of t, and the log-SNR bisection tree that validation, the ESGF
    experts and the MoE router share.

    t: logit-normal (logit_mean, logit_std) with an SD3 shift, plus a share `t1_fraction` of every
    batch at t = 1 exactly: pure noise, the only input the default 1-NFE sampler gives the network
    (a shift-3 logit-normal draws t > 0.99 about once in 4000 samples; shift 1: 2e-6).
    The tree (depth `bisection_depth`, 2**depth leaves) splits log-SNR at
      split = "mass"   (default) the quantiles k / 2**depth of the training lambda distribution, so every
                       node halves its parent's probability mass (rounded to 0.01 in lambda);
              "lambda" equal widths of [lambda_min, lambda_max] (the outer leaves keep the tails);
              "fixed"  `split_points`: the 2**depth - 1 leaf boundaries, increasing, inside
                       (lambda_min, lambda_max); the tree is the balanced one over them."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    t1_fraction: float = 0.1
    lambda_min: float = -6.0
    lambda_max: float = 6.0
    bisection_depth: int = 2
    split: Literal["mass", "lambda", "fixed"] = "mass"
    split_points: tuple[float, ...] = ()
    val_points_per_interval: int = 4

    def __post_init__(self):
        if self.logit_std <= 0:
            raise ValueError(f"flow.logit_std must be > 0, got {self.logit_std}")
        if self.shift <= 0:
            raise ValueError(f"flow.shift must be > 0, got {self.shift}")
        if not 0 <= self.t1_fraction < 1:
            raise ValueError(f"flow.t1_fraction must lie in [0, 1) (the share of each batch at t = 1), got {self.t1_fraction}")
        if self.val_points_per_interval < 1:
            raise ValueError(f"flow.val_points_per_interval must be >= 1, got {self.val_points_per_interval}")
        if not 0 <= self.bisection_depth <= 6:
            raise ValueError(f"flow.bisection_depth must be in 0..6 (1..64 leaves), got {self.bisection_depth}")
        bisect(self.lambda_min, self.lambda_max, 0)  # validates the range
        if self.split != "fixed" and self.split_points:
            raise ValueError(f"flow.split_points is only read with flow.split = \"fixed\" (flow.split is {self.split!r})")
        if self.split == "fixed":
            pts, need = list(self.split_points), 2**self.bisection_depth - 1
            if len(pts) != need:
                raise ValueError(f"flow.split_points needs {need} increasing log-SNR values for flow.bisection_depth="
                                 f"{self.bisection_depth}, got {len(pts)}")
            if pts != sorted(set(pts)):
                raise ValueError(f"flow.split_points must be strictly increasing, got {pts}")
            outside = [x for x in pts if not self.lambda_min < x < self.lambda_max]
            if outside:
                raise ValueError(f"flow.split_points {outside} lie outside the range (flow.lambda_min, flow.lambda_max) = "
                                 f"({self.lambda_min:g}, {self.lambda_max:g})")
        edges = self.edges()
        if edges != sorted(set(edges)):
            raise ValueError(f"flow.bisection_depth={self.bisection_depth} splits the training distribution finer than "
                             f"0.01 in log-SNR; lower it or use flow.split = \"fixed\"")

    @property
    def lambda_mean(self) -> float:
        return -2.0 * self.logit_mean - 2.0 * math.log(self.shift)

    @property
    def lambda_std(self) -> float:
        return 2.0 * self.logit_std

    def edges(self) -> list[float]:
        """The 2**depth - 1 interior leaf boundaries in log-SNR, increasing."""
        k = 2**self.bisection_depth
        if self.split == "fixed":
            return [float(x) for x in self.split_points]
        if self.split == "lambda":
            return [iv.lo for iv in bisect(self.lambda_min, self.lambda_max, self.bisection_depth)[1:]]
        u = torch.arange(1, k, dtype=torch.float64) / k
        return [round(float(x), 2) for x in self._lambda_at_quantile(u)]

    def tree(self) -> list[list[Node]]:
        """Levels 0 (the full range) .. bisection_depth (the leaves) of the bisection tree."""
        return tree_levels(self.edges())

    def intervals(self) -> list[Interval]:
        """The leaves: what validation reports per interval and what a bundle's experts cover."""
        return [n.interval for n in self.tree()[-1]]

    def _cdf(self, lam: float) -> float:
        if math.isinf(lam):
            return 0.0 if lam < 0 else 1.0
        return 0.5 * math.erfc(-(lam - self.lambda_mean) / (self.lambda_std * math.sqrt(2.0)))

    def mass(self, interval: Interval) -> float:
        """Probability that a training t of the logit-normal part falls in the interval (the
        t = 1 share is not counted)."""
        return self._cdf(interval.hi) - self._cdf(interval.lo)

    def _lambda_at_quantile(self, u: torch.Tensor) -> torch.Tensor:
        return self.lambda_mean + self.lambda_std * torch.special.ndtri(u.double())

    def sample_t(
        self, n: int, interval: Interval = FULL_RANGE, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n training times (float32, shape [n]), logit-normal with shift, restricted to the
        interval by an exact inverse-CDF draw, strictly inside (0, 1). When the interval reaches
        lambda = -inf (t = 1), floor(n * t1_fraction) of them, or one more with the remaining
        probability, are exactly 1 (placed at random positions)."""
        lo_u, hi_u = self._cdf(interval.lo), self._cdf(interval.hi)
        if hi_u - lo_u < 1e-12:
            raise ValueError(f"log-SNR interval {interval} has no probability mass under flow settings {self}")
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        u = (lo_u + u * (hi_u - lo_u)).clamp(1e-12, 1 - 1e-12)
        lam = self._lambda_at_quantile(u)
        # a small margin keeps float32 rounding of t from leaving the half-open interval
        margin = min(1e-4, (interval.hi - interval.lo) / 4)
        lam = lam.clamp(min=interval.lo + margin if math.isfinite(interval.lo) else -1e6,
                        max=interval.hi - margin if math.isfinite(interval.hi) else 1e6)
        t = t_of_lambda(lam).clamp(1e-6, 1 - 1e-6)
        if self.t1_fraction > 0 and interval.lo == -INF:
            whole, rest = divmod(n * self.t1_fraction, 1.0)
            k = int(whole) + int(torch.rand(1, generator=generator, dtype=torch.float64).item() < rest)
            t[torch.randperm(n, generator=generator)[:k]] = 1.0
        return t.float()

    def validation_grid(self, interval: Interval) -> torch.Tensor:
        """A fixed, stratified set of t inside the interval: the midpoints of
        `val_points_per_interval` equal-probability bins of the training distribution."""
        k = self.val_points_per_interval
        lo_u, hi_u = self._cdf(interval.lo), self._cdf(interval.hi)
        u = lo_u + (torch.arange(k, dtype=torch.float64) + 0.5) / k * (hi_u - lo_u)
        return t_of_lambda(self._lambda_at_quantile(u)).clamp(1e-6, 1 - 1e-6).float()


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t of shape [B] broadcast over the other dims."""
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = eps - x0: the derivative dx_t/dt along the straight path."""
    return noise - x0
