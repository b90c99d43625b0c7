"""The `[esgf]` section of the experiment config: knee and divergence detection, expert jobs.

The trainer keeps this section as an opaque table; it is validated here (unknown keys are
rejected by dotted name through `linearsr.trainer.configlib.from_dict`). Example:

    [esgf]
    stop_pretrain_on_divergence = true
    poll_seconds = 30
    [esgf.knee]
    smoothing = "median_ema"   # "ema" | "median_ema" | "none"
    window = 5
    sensitivity = 1.0          # Kneedle S
    min_validations = 8
    [esgf.divergence]
    spike_factor = 2.0
    rise_fraction = 0.1
    window = 3
    [esgf.experts]
    steps = 200
    overrides = ["optim.lr=5e-5"]
    num_cpus = 1
    max_retries = 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from linearsr.model.flow import FlowConfig, Interval, bisect
from linearsr.trainer.configlib import from_dict

STEPS_KEY = "run.steps"  # the trainer's step budget, set from esgf.experts.steps


@dataclass(frozen=True)
class KneeConfig:
    """Smoothing + Kneedle (kneed.KneeLocator) on the validation loss over steps.

    smoothing: "ema" = forward-backward EMA (zero phase: no lag, so the knee is not pushed late),
    "median_ema" = a centred running median of `window` points first (removes single-validation
    spikes), then the same EMA; "none" = raw values. The EMA's alpha is 2 / (window + 1).
    Kneedle: `sensitivity` is its S (higher = more conservative), `curve`/`direction` describe a
    falling loss (convex, decreasing), `online=False` keeps the first knee found (the earlier,
    safer one; True refines to the last), `interp_method="interp1d"` uses the points as given.
    Measured on val = 0.5 exp(-step/600) + 0.1 sampled every 100 steps: the knee lands within one
    validation of Kneedle on the noise-free curve, within three with noise of 2 % of the drop.
    A knee on a run still training is final once `confirm_validations` validations follow it and,
    over those, the smoothed loss fell by at most `plateau_tolerance` of its total drop so far."""

    smoothing: Literal["ema", "median_ema", "none"] = "median_ema"
    window: int = 5
    sensitivity: float = 1.0
    curve: Literal["convex", "concave"] = "convex"
    direction: Literal["decreasing", "increasing"] = "decreasing"
    online: bool = False
    interp_method: Literal["interp1d", "polynomial"] = "interp1d"
    min_validations: int = 8
    confirm_validations: int = 3
    plateau_tolerance: float = 0.05

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"esgf.knee.window must be >= 1, got {self.window}")
        if self.sensitivity <= 0:
            raise ValueError(f"esgf.knee.sensitivity must be > 0, got {self.sensitivity}")
        if self.min_validations < 3:
            raise ValueError(f"esgf.knee.min_validations must be >= 3 (Kneedle needs a curve), got {self.min_validations}")
        if self.confirm_validations < 1:
            raise ValueError(f"esgf.knee.confirm_validations must be >= 1, got {self.confirm_validations}")
        if not 0 <= self.plateau_tolerance < 1:
            raise ValueError(f"esgf.knee.plateau_tolerance must be in [0, 1), got {self.plateau_tolerance}")


@dataclass(frozen=True)
class DivergenceConfig:
    """Divergence begins at the first validation that is non-finite (val or train loss), or whose
    raw val loss exceeds `spike_factor` x the lowest val loss before it, or where the causally
    smoothed val loss stays >= (1 + rise_fraction) x its running minimum for `window` validations
    in a row (the onset is the first of them)."""

    spike_factor: float = 2.0
    rise_fraction: float = 0.1
    window: int = 3

    def __post_init__(self):
        if self.spike_factor <= 1:
            raise ValueError(f"esgf.divergence.spike_factor must be > 1, got {self.spike_factor}")
        if self.rise_fraction <= 0:
            raise ValueError(f"esgf.divergence.rise_fraction must be > 0, got {self.rise_fraction}")
        if self.window < 1:
            raise ValueError(f"esgf.divergence.window must be >= 1, got {self.window}")


@dataclass(frozen=True)
class ExpertsConfig:
    """One fine-tune job per log-SNR interval, started from the ESGF checkpoint.

    depth: bisection depth of [flow.lambda_min, flow.lambda_max] (None = flow.bisection_depth;
    depth 2 = 4 experts). steps: the fine-tune's step budget (0 = the trainer's own). overrides:
    extra `section.key=value` for every expert. num_cpus: CPUs reserved for each job's driver.
    max_retries: extra attempts after a failed job. parallel: at most this many expert jobs at once
    (0 = all). full_range_first: one ESGF fine-tune over the full range first; the experts then
    start from its best checkpoint. command: the trainer command that the contract's arguments
    (--config --run --init --t-interval=) follow; `python -m linearsr` runs the package that the
    sidecar ships with each job (cluster/jobs.py)."""

    depth: int | None = None
    steps: int = 0
    overrides: tuple[str, ...] = ()
    num_cpus: float = 1.0
    max_retries: int = 1
    parallel: int = 0
    full_range_first: bool = False
    command: str = "python -m linearsr train"

    def __post_init__(self):
        if self.depth is not None and not 0 <= self.depth <= 6:
            raise ValueError(f"esgf.experts.depth must be in 0..6 (1..64 experts), got {self.depth}")
        if self.steps < 0:
            raise ValueError(f"esgf.experts.steps must be >= 0 (0 = the trainer's budget), got {self.steps}")
        for item in self.overrides:
            if "=" not in item:
                raise ValueError(f"esgf.experts.overrides item {item!r} is not section.key=value")
        if self.num_cpus < 0:
            raise ValueError(f"esgf.experts.num_cpus must be >= 0, got {self.num_cpus}")
        if self.max_retries < 0:
            raise ValueError(f"esgf.experts.max_retries must be >= 0, got {self.max_retries}")
        if self.parallel < 0:
            raise ValueError(f"esgf.experts.parallel must be >= 0 (0 = all at once), got {self.parallel}")
        if not self.command.strip():
            raise ValueError("esgf.experts.command must name the trainer command, e.g. 'python -m linearsr train'")

    def trainer_overrides(self) -> list[str]:
        """The dotted overrides every expert's `linearsr train` gets: the step budget, then `overrides`."""
        return ([f"{STEPS_KEY}={self.steps}"] if self.steps else []) + list(self.overrides)


@dataclass(frozen=True)
class ESGFConfig:
    knee: KneeConfig = field(default_factory=KneeConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    stop_pretrain_on_divergence: bool = True
    poll_seconds: float = 30.0
    ray_address: str = ""  # Jobs API URL; "" = RAY_ADDRESS or the `make ray-up` head

    def __post_init__(self):
        if self.poll_seconds <= 0:
            raise ValueError(f"esgf.poll_seconds must be > 0, got {self.poll_seconds}")

    def params(self) -> dict:
        """The detection parameters, as recorded in decision.json."""
        from linearsr.trainer.configlib import to_dict

        return {"knee": to_dict(self.knee), "divergence": to_dict(self.divergence)}


def esgf_from_config(config: dict) -> ESGFConfig:
    """ESGFConfig from a resolved experiment config (the dict in RUN/config.json)."""
    section = config.get("esgf") or {}
    if not isinstance(section, dict):
        raise ValueError(f"config key 'esgf' must be a table (section), got {section!r}")
    return from_dict(ESGFConfig, section, prefix="esgf")


def check_config(config: dict) -> ESGFConfig:
    """The [esgf] table of a resolved experiment config, checked when the run is launched or
    submitted rather than hours later when the sidecar acts on it: its own keys and values, and
    that the experts' overrides apply to the trainer's config."""
    from linearsr.trainer import configlib
    from linearsr.trainer.config import TrainConfig

    esgf = esgf_from_config(config)
    try:
        configlib.from_dict(TrainConfig, configlib.apply_overrides(config, esgf.experts.trainer_overrides()))
    except ValueError as e:
        raise ValueError(f"esgf.experts.overrides: {e}") from None
    return esgf


def expert_intervals(config: dict, esgf: ESGFConfig) -> list[Interval]:
    """The experts' log-SNR partition: bisection of the flow section's λ range."""
    flow = from_dict(FlowConfig, config.get("flow") or {}, prefix="flow")
    depth = flow.bisection_depth if esgf.experts.depth is None else esgf.experts.depth
    return bisect(flow.lambda_min, flow.lambda_max, depth)
