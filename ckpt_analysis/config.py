"""The `[esgf]` section of the experiment config: the knee rule, divergence, the expert tree.

The trainer keeps this section as an opaque table; it is validated here (unknown keys are
rejected by dotted name through `linearsr.trainer.configlib.from_dict`) when a run is launched
(`check_config`, called by `linearsr train` and `linearsr submit`). The tree's shape (depth and
split points) is the [flow] section's bisection, which validation and the MoE router share.
Example (configs/base_x4.toml explains each value):

    [esgf]
    stop_at_knee = true               # stop the pretrain once the knee is confirmed
    stop_pretrain_on_divergence = true
    poll_seconds = 30
    [esgf.knee]
    window = 5                        # validations per smoothing line
    tolerance = 0.05                  # share of the projected total drop the knee may leave unused
    patience = 2
    confidence = 0.0
    min_validations = 6
    [esgf.divergence]
    spike_factor = 2.0
    rise_fraction = 0.1
    window = 3
    [esgf.experts]
    steps = 10000                     # every tree node's fine-tune budget
    init = "knee"                     # or "per_interval"
    overrides = ["optim.lr=3e-5"]
    num_cpus = 1
    max_retries = 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from linearsr.core.storage import StorageConfig
from linearsr.model.flow import FlowConfig
from linearsr.trainer.configlib import from_dict

STEPS_KEY = "run.steps"  # the trainer's step budget, set from esgf.experts.steps
SHARED_KEYS = ("cluster.num_workers", "optim.grad_accum")  # set per level by esgf.experts.share_workers


@dataclass(frozen=True)
class KneeConfig:
    """The knee rule (ckpt_analysis/knee.py has the formulas; docs/operations.md how to tune it).

    window: validations in each smoothing line and in the "recent" drop; larger = less noise,
    later decisions. tolerance: the share of the projected total drop (to the end of the budget)
    that the knee may leave unused, and the most the last `window` validations may still gain
    when the rule fires. patience: prefixes in a row the rule must hold on. confidence: standard
    errors added to the fitted falling rate, so scatter that merely looks flat does not fire the
    rule (0 = the fitted slope as it is; 1 for slow power-law curves whose noise rivals their
    per-validation gain; it delays a decision on a true plateau). min_validations: none before
    this many."""

    window: int = 5
    tolerance: float = 0.05
    patience: int = 2
    confidence: float = 0.0
    min_validations: int = 6

    def __post_init__(self):
        if self.window < 3:
            raise ValueError(f"esgf.knee.window must be >= 3 (a line through fewer points has no scatter), got {self.window}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"esgf.knee.tolerance must lie in (0, 1) (a share of the loss drop), got {self.tolerance}")
        if self.patience < 1:
            raise ValueError(f"esgf.knee.patience must be >= 1, got {self.patience}")
        if self.confidence < 0:
            raise ValueError(f"esgf.knee.confidence must be >= 0 (standard errors), got {self.confidence}")
        if self.min_validations < self.window:
            raise ValueError(f"esgf.knee.min_validations must be >= esgf.knee.window={self.window}, got {self.min_validations}")


@dataclass(frozen=True)
class DivergenceConfig:
    """Divergence begins at the first validation that is non-finite (val or train loss), or whose
    raw val loss exceeds `spike_factor` x the lowest val loss before it, or where the trailing
    median of 3 val losses stays >= (1 + rise_fraction) x its running minimum for `window`
    validations in a row (the onset is where that climb began). It is read on the raw weights'
    loss (val_loss_raw) when the run keeps EMA weights: a raw run shows divergence first."""

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
    """The expert tree: one fine-tune job per node of [flow]'s bisection tree, level by level.

    Level 1 (the two halves of log-SNR) starts from the ESGF decision's checkpoint (init =
    "knee"), or each half from the pretrain checkpoint best for its own interval (init =
    "per_interval": the knee rule on that interval's val_loss_by_interval curve); every node of
    level k >= 2 from its parent's best checkpoint. A level's jobs run in parallel; a level starts
    when the one above it is done; the leaves become the bundle's experts.
    steps: every node's fine-tune budget (0 = the trainer's own). overrides: extra
    `section.key=value` for every node (a lower LR, the workers per job). num_cpus: CPUs reserved
    for each job's driver. share_workers: the jobs running at once (a level, and the control beside
    it) share the pretrain's cluster.num_workers equally (at least 1 each) and raise
    optim.grad_accum to keep the pretrain's global batch, so the tree never holds more workers than
    the pretrain did. max_retries: extra attempts after a failed job. parallel: at most this
    many jobs at once (0 = all). full_range_first: a level 0 first, one fine-tune over the full
    range from the decision's checkpoint; level 1 then starts from its best checkpoint.
    control: also fine-tune the decision's checkpoint once over the full range with as many steps
    as the whole tree together (an equal-compute baseline for ablations), in parallel with the
    tree; it is never part of the bundle; `control_overrides` come after `overrides` for it alone
    (e.g. the same global batch spread over more workers, so it keeps pace). command: the trainer command that the contract's
    arguments (--config --run --init --t-interval=) follow; `python -m linearsr` runs the package
    that the sidecar ships with each job (cluster/jobs.py)."""

    steps: int = 0
    init: Literal["knee", "per_interval"] = "knee"
    overrides: tuple[str, ...] = ()
    num_cpus: float = 1.0
    share_workers: bool = False
    max_retries: int = 1
    parallel: int = 0
    full_range_first: bool = False
    control: bool = False
    control_overrides: tuple[str, ...] = ()
    command: str = "python -m linearsr train"

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"esgf.experts.steps must be >= 0 (0 = the trainer's budget), got {self.steps}")
        for key in ("overrides", "control_overrides"):
            for item in getattr(self, key):
                if "=" not in item:
                    raise ValueError(f"esgf.experts.{key} item {item!r} is not section.key=value")
        if self.num_cpus < 0:
            raise ValueError(f"esgf.experts.num_cpus must be >= 0, got {self.num_cpus}")
        if self.max_retries < 0:
            raise ValueError(f"esgf.experts.max_retries must be >= 0, got {self.max_retries}")
        if self.parallel < 0:
            raise ValueError(f"esgf.experts.parallel must be >= 0 (0 = all at once), got {self.parallel}")
        clash = [o.split("=")[0] for o in self.overrides if o.split("=")[0] in SHARED_KEYS]
        if self.share_workers and clash:
            raise ValueError(f"esgf.experts.overrides sets {', '.join(clash)}, which esgf.experts.share_workers = true "
                             "computes per level; drop one of them")
        if self.init == "per_interval" and self.full_range_first:
            raise ValueError("esgf.experts.init = \"per_interval\" starts level 1 from the pretrain's per-interval "
                             "checkpoints, so it cannot follow esgf.experts.full_range_first = true; set one of them")
        if not self.command.strip():
            raise ValueError("esgf.experts.command must name the trainer command, e.g. 'python -m linearsr train'")

    def trainer_overrides(self, steps: int | None = None, workers: tuple[int, int] | None = None) -> list[str]:
        """The dotted overrides a node's `linearsr train` gets: the step budget (`steps`, default
        esgf.experts.steps), (num_workers, grad_accum) when shared, then `overrides`."""
        steps = self.steps if steps is None else steps
        shared = [f"{k}={v}" for k, v in zip(SHARED_KEYS, workers)] if workers else []
        return ([f"{STEPS_KEY}={steps}"] if steps else []) + shared + list(self.overrides)


def shared_workers(config: dict, jobs: int) -> tuple[int, int]:
    """(num_workers, grad_accum) for each of `jobs` fine-tunes sharing the pretrain's workers,
    keeping its global batch (workers x grad_accum x data.batch_size) as close as integers allow."""
    workers = int((config.get("cluster") or {}).get("num_workers", 1))
    accum = int((config.get("optim") or {}).get("grad_accum", 1))
    each = max(1, workers // max(1, jobs))
    return each, max(1, round(workers * accum / each))


@dataclass(frozen=True)
class ESGFConfig:
    knee: KneeConfig = field(default_factory=KneeConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    stop_at_knee: bool = True  # stop the pretrain job once the knee is confirmed (its workers go to the experts)
    stop_pretrain_on_divergence: bool = True
    poll_seconds: float = 30.0
    lease_seconds: float = 120.0  # the sidecar's lease on the run: renewed every third of this; a dead holder's expires
    ray_address: str = ""  # Jobs API URL; "" = RAY_ADDRESS or the `make ray-up` head

    def __post_init__(self):
        if self.poll_seconds <= 0:
            raise ValueError(f"esgf.poll_seconds must be > 0, got {self.poll_seconds}")
        if self.lease_seconds <= 0:
            raise ValueError(f"esgf.lease_seconds must be > 0, got {self.lease_seconds}")

    def params(self) -> dict:
        """The detection parameters, as recorded in decision.json."""
        from linearsr.trainer.configlib import to_dict

        return {"knee": to_dict(self.knee), "divergence": to_dict(self.divergence), "init": self.experts.init}


def esgf_from_config(config: dict) -> ESGFConfig:
    """ESGFConfig from a resolved experiment config (the dict in RUN/config.json)."""
    section = config.get("esgf") or {}
    if not isinstance(section, dict):
        raise ValueError(f"config key 'esgf' must be a table (section), got {section!r}")
    return from_dict(ESGFConfig, section, prefix="esgf")


def flow_from_config(config: dict) -> FlowConfig:
    return from_dict(FlowConfig, config.get("flow") or {}, prefix="flow")


def storage_from_config(config: dict) -> StorageConfig:
    """The run's storage retry settings (its `[storage]` table), which the sidecar uses too."""
    return from_dict(StorageConfig, config.get("storage") or {}, prefix="storage")


def check_config(config: dict) -> ESGFConfig:
    """The [esgf] table of a resolved experiment config, checked when the run is launched or
    submitted rather than hours later when the sidecar acts on it: its own keys and values, that
    [flow] gives the experts a tree, and that the experts' overrides apply to the trainer's config."""
    from linearsr.trainer import configlib
    from linearsr.trainer.config import TrainConfig

    esgf = esgf_from_config(config)
    if flow_from_config(config).bisection_depth < 1:
        raise ValueError("flow.bisection_depth must be >= 1: it is the depth of the ESGF expert tree "
                         "(depth d gives 2**d experts; 2 is the default)")
    overrides = esgf.experts.trainer_overrides()
    for key, extra in (("overrides", []), ("control_overrides", list(esgf.experts.control_overrides))):
        try:
            configlib.from_dict(TrainConfig, configlib.apply_overrides(config, overrides + extra))
        except ValueError as e:
            raise ValueError(f"esgf.experts.{key}: {e}") from None
    return esgf
