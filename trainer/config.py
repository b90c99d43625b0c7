"""The experiment config: one frozen dataclass per component, loaded from a TOML preset or a
resolved `config.json`, with dotted command-line overrides (`optim.lr=2e-4`).

    cfg = load_config("configs/cpu_tiny.toml", ["optim.lr=1e-3", "run.steps=50"])

Unknown keys and wrong types are rejected with the dotted key in the message (configlib);
impossible values raise ValueError in each section's __post_init__. The resolved config is
written to RUN/config.json and into every checkpoint's meta.json. It never holds credentials:
S3 keys come from the environment only, and URLs with embedded credentials are rejected."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from linearsr.core.storage import StorageConfig
from linearsr.data.config import DataConfig
from linearsr.model.config import ModelConfig
from linearsr.model.flow import FlowConfig, Interval
from linearsr.trainer import configlib

_CREDENTIAL_URL = re.compile(r"^[a-z0-9+.-]+://[^/@]*:[^/@]*@", re.IGNORECASE)


def check_url(key: str, url: str) -> None:
    """A URL must not carry credentials (`s3://KEY:SECRET@bucket`): they would land in logs and config.json."""
    if url and _CREDENTIAL_URL.match(url):
        raise ValueError(f"{key} must not contain credentials (user:password@); set AWS_ACCESS_KEY_ID / "
                         "AWS_SECRET_ACCESS_KEY in the environment instead")


@dataclass(frozen=True)
class RunSection:
    name: str = "run"
    url: str = ""  # run dir: a local folder or s3://bucket/prefix/NAME; "" means runs/<name>
    seed: int = 0
    steps: int = 300  # optimizer steps
    log_every: int = 10  # log line every N steps (metrics.jsonl gets one record per validation)

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        check_url("run.url", self.url)
        if self.steps < 1:
            raise ValueError(f"run.steps must be >= 1, got {self.steps}")
        if self.log_every < 1:
            raise ValueError(f"run.log_every must be >= 1, got {self.log_every}")

    @property
    def run_url(self) -> str:
        return self.url or f"runs/{self.name}"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0  # the cosine schedule ends here
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0  # 0 = no EMA weights

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must both lie in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must lie in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must lie in [0, 1) (0 = off), got {self.ema_decay}")


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_stage: Literal[2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass(frozen=True)
class ValidationConfig:
    every: int = 25  # steps between validations (one metrics.jsonl record each)
    max_batches: int = 4  # per rank; the same batches every time
    image_every: int = 100  # steps between LR | 1-NFE | N-step | HR grids in TensorBoard; 0 = off
    sample_steps: int = 8  # N of the N-step sample in the grid
    num_images: int = 2  # rows of the grid

    def __post_init__(self):
        for name in ("every", "max_batches", "sample_steps", "num_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"validation.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_every < 0 or self.image_every % self.every:
            raise ValueError(f"validation.image_every must be 0 (off) or a multiple of validation.every={self.every}, "
                             f"got {self.image_every}")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50  # steps; a multiple of validation.every (the checkpoint's metrics record names it)
    keep: int | None = None  # keep the last N (plus the best validation loss); None = keep all

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"checkpoint.every must be >= 1, got {self.every}")
        if self.keep is not None and self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1 or null (keep all), got {self.keep}")


@dataclass(frozen=True)
class ClusterConfig:
    num_workers: int = 2
    cpus_per_worker: float = 1.0  # fractions allowed (several small jobs on one machine)
    use_gpu: bool = False
    address: str = ""  # Ray address to attach to; "" = RAY_ADDRESS or a new local Ray
    max_failures: int = 2  # restarts from the last checkpoint after a worker dies; -1 = forever

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"cluster.num_workers must be >= 1, got {self.num_workers}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cluster.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"cluster.max_failures must be >= -1 (-1 = retry forever), got {self.max_failures}")
        check_url("cluster.address", self.address)


@dataclass(frozen=True)
class FinetuneConfig:
    init: str = ""  # checkpoint URL to take the weights from (fresh optimizer, step 0)
    t_interval: str = ""  # "LO,HI" in log-SNR: train t only inside; validation reports it

    def __post_init__(self):
        check_url("finetune.init", self.init)
        if self.t_interval:
            Interval.parse(self.t_interval)

    @property
    def interval(self) -> Interval | None:
        return Interval.parse(self.t_interval) if self.t_interval else None


@dataclass(frozen=True)
class TagsConfig:
    """Where the training samples' tags come from (trainer/tagsource.py)."""

    source: Literal["tagger", "photo"] = "photo"  # tagger: its tags for each sample's own LR crop; photo: the shards' (ablation)
    tagger: str = ""  # the tagger .safetensors (`linearsr tagger train` writes one); copied into the run at its first start

    def __post_init__(self):
        if self.source not in ("tagger", "photo"):
            raise ValueError(f"tags.source must be 'tagger' or 'photo', got {self.source!r}")
        if self.source == "tagger" and not self.tagger:
            raise ValueError("tags.source='tagger' needs tags.tagger = a tagger file (`linearsr tagger train --shards "
                             "SHARDS --out runs/tagger/tagger` writes one), or set tags.source='photo'")
        check_url("tags.tagger", self.tagger)
        if self.tagger and "://" not in self.tagger:  # the workers run in another folder
            object.__setattr__(self, "tagger", os.path.abspath(self.tagger))


@dataclass(frozen=True)
class FaultConfig:
    """Test-only fault injection; every field's default is inert."""

    nan_at_step: int = 0  # from this step on the training loss is NaN (divergence); 0 = never
    die_at_step: int = 0  # worker `die_rank` exits abruptly at this step (0 = never) ...
    die_rank: int = 1
    die_once_marker: str = ""  # ... only if this file does not exist yet (it is created first)
    die_during_checkpoint: bool = False  # ... after saving its shards, before the checkpoint completes

    def __post_init__(self):
        for name in ("nan_at_step", "die_at_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"faults.{name} must be a step >= 1, or 0 (off), got {getattr(self, name)}")
        if self.die_rank < 0:
            raise ValueError(f"faults.die_rank must be >= 0, got {self.die_rank}")


@dataclass(frozen=True)
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tags: TagsConfig = field(default_factory=TagsConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    esgf: dict[str, Any] = field(default_factory=dict)  # the sidecar's table, validated by ckpt_analysis

    def __post_init__(self):
        if self.checkpoint.every % self.validation.every:
            raise ValueError(
                f"checkpoint.every={self.checkpoint.every} must be a multiple of validation.every="
                f"{self.validation.every} (each checkpoint's metrics record carries its URL)")
        if self.model.scale != self.data.scale:
            raise ValueError(f"model.scale={self.model.scale} and data.scale={self.data.scale} must match")
        if self.optim.ema_decay > 0 and self.deepspeed.zero_stage == 3:
            raise ValueError("optim.ema_decay > 0 needs deepspeed.zero_stage=2 (ZeRO-3 partitions the weights the EMA would copy)")
        iv = self.finetune.interval
        if iv is not None:
            self.flow.sample_t(1, iv)  # raises when the interval has no probability mass
        check_url("data.shards", self.data.shards)
        check_url("data.s3_endpoint", self.data.s3_endpoint or "")

    @property
    def run_url(self) -> str:
        return self.run.run_url

    @property
    def interval(self) -> Interval | None:
        return self.finetune.interval

    def to_dict(self) -> dict[str, Any]:
        return configlib.to_dict(self)

    def replace(self, **sections: Any) -> "TrainConfig":
        """A copy with some sections replaced by dataclasses or {key: value} updates."""
        new = {}
        for name, value in sections.items():
            if isinstance(value, dict) and name != "esgf":
                value = dataclasses.replace(getattr(self, name), **value)
            new[name] = value
        return dataclasses.replace(self, **new)


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A TOML preset (`configs/*.toml`) or a resolved RUN/config.json, plus dotted overrides.
    `path=None` starts from the defaults."""
    if path is None:
        data: dict = {}
    elif path.endswith(".json"):
        try:
            from linearsr.core.storage import read_json

            data = read_json(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    else:
        data = configlib.load_toml(path)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of sections, got {type(data).__name__}")
    data = configlib.apply_overrides(data, list(overrides))
    return configlib.from_dict(TrainConfig, data)


def config_text(cfg: TrainConfig) -> str:
    """The resolved config as indented JSON (what RUN/config.json holds)."""
    from linearsr.core.storage import dumps

    return dumps(cfg.to_dict(), indent=2, sort_keys=True)
