"""Typed settings of the data pipeline: where the shards are, crops, batching, degradation.

Both dataclasses are frozen and validate in `__post_init__`; a bad value raises ValueError
naming the key as it appears in the experiment config (`data.crop`, `data.degradation.jpeg_quality`).
No credentials live here: S3 keys come from the environment / AWS config only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest")
# Real-ESRGAN's kernel families, in the order of `kernel_prob` / `kernel_prob2`
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def _check_range(name: str, pair: tuple, lo: float, hi: float | None = None) -> None:
    a, b = pair
    if not (a <= b):
        raise ValueError(f"{name} must be (low, high) with low <= high, got {list(pair)}")
    if a < lo or (hi is not None and b > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must lie in {bound}, got {list(pair)}")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


def _check_probs(name: str, probs: tuple, n: int, what: str) -> None:
    if len(probs) != n or any(x < 0 for x in probs) or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"{name} must be {n} probabilities ({what}) summing to 1, got {list(probs)}")


@dataclass(frozen=True)
class TagThresholds:
    """When a training sample's degradation earns a tag (`degradations.degradation_tags`)."""

    blur: float = 2.0  # "strong blur": the strongest blur sigma >= this, in HR pixels
    noise: float = 15.0  # "heavy noise": the added noise std >= this, in 8-bit units
    jpeg: float = 50.0  # "jpeg artifacts": the lowest JPEG quality <= this

    def __post_init__(self):
        for name in ("blur", "noise", "jpeg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.degradation.tags.{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class DegradationConfig:
    """HR -> LR. "realistic" is Real-ESRGAN's second-order model with its published defaults
    (options/train_realesrgan_x4plus.yml; data/README.md lists the few deviations):
        round 1: blur (6 Gaussian families or sinc) -> resize (up/down/keep) -> Gaussian or Poisson
                 noise (colour or gray) -> JPEG
        round 2: blur (second_blur_prob) -> resize RELATIVE TO THE LR SIZE -> noise
        final:   [resize to H/s x W/s + sinc] and JPEG, in random order; 8-bit quantisation
    "bicubic" is a plain antialiased bicubic down-scale (benchmark-style evaluation).
    Noise sigmas are in 8-bit units (x/255); JPEG qualities are floats as in Real-ESRGAN."""

    mode: Literal["realistic", "bicubic"] = "realistic"
    blur_kernel_size: tuple[int, int] = (7, 21)  # odd sizes drawn from this range (both rounds, final sinc)
    usm_hr: bool = False  # train on the unsharp-masked HR (Real-ESRGAN's gt_usm); the LR is made from it
    # first round
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)  # generalized Gaussian shape
    betap_range: tuple[float, float] = (1.0, 2.0)  # plateau shape
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)  # factor of the HR size
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")  # every resize, both rounds and final
    gaussian_noise_prob: float = 0.5  # else Poisson noise
    gray_noise_prob: float = 0.4
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    jpeg_quality: tuple[float, float] = (30.0, 95.0)
    # second round
    second_blur_prob: float = 0.8
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)  # factor of the LR size
    gaussian_noise_prob2: float = 0.5
    gray_noise_prob2: float = 0.4
    noise_sigma2: tuple[float, float] = (1.0, 25.0)
    poisson_scale2: tuple[float, float] = (0.05, 2.5)
    jpeg_quality2: tuple[float, float] = (30.0, 95.0)
    final_sinc_prob: float = 0.8
    tags: TagThresholds = field(default_factory=TagThresholds)

    def __post_init__(self):
        p = "data.degradation."
        for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob", "second_blur_prob", "sinc_prob2",
                     "gaussian_noise_prob2", "gray_noise_prob2", "final_sinc_prob"):
            _check_prob(p + name, getattr(self, name))
        _check_range(p + "blur_kernel_size", self.blur_kernel_size, 3, 21)
        lo, hi = self.blur_kernel_size
        if not any(k % 2 for k in range(lo, hi + 1)):
            raise ValueError(f"{p}blur_kernel_size must include an odd size, got {list(self.blur_kernel_size)}")
        for name in ("kernel_prob", "kernel_prob2"):
            _check_probs(p + name, getattr(self, name), len(KERNEL_TYPES), ", ".join(KERNEL_TYPES))
        for name in ("resize_probs", "resize_probs2"):
            _check_probs(p + name, getattr(self, name), 3, "up, down, keep")
        for name in ("blur_sigma", "blur_sigma2", "betag_range", "betag_range2", "betap_range", "betap_range2"):
            _check_range(p + name, getattr(self, name), 0.01)
        for name in ("betag_range", "betag_range2", "betap_range", "betap_range2"):
            lo, hi = getattr(self, name)
            if not lo <= 1.0 <= hi:
                raise ValueError(f"{p}{name} must contain 1.0 (half the shapes are drawn below it, half above), got {[lo, hi]}")
        for name in ("noise_sigma", "noise_sigma2", "poisson_scale", "poisson_scale2"):
            _check_range(p + name, getattr(self, name), 0.0)
        for name in ("resize_range", "resize_range2"):
            lo, hi = getattr(self, name)
            _check_range(p + name, (lo, hi), 0.01, 4.0)
            if not lo <= 1.0 <= hi:
                raise ValueError(f"{p}{name} must contain 1.0 (down-scale below it, up-scale above), got {[lo, hi]}")
        if not self.resize_modes or any(m not in RESIZE_MODES for m in self.resize_modes):
            raise ValueError(f"{p}resize_modes must be a non-empty list from {list(RESIZE_MODES)}, got {list(self.resize_modes)}")
        for name in ("jpeg_quality", "jpeg_quality2"):
            _check_range(p + name, getattr(self, name), 1, 100)


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how batches are made.

    `shards` is the root URL written by `linearsr shards build` (local folder or s3://...):
    it holds manifest.json, train/ and val/. `batch_size` is per rank."""

    shards: str = "runs/data/shards"
    crop: int = 128  # HR crop side (LR side = crop // scale)
    scale: int = 4
    batch_size: int = 8
    num_workers: int = 2
    shuffle_buffer: int = 256  # crops per shuffle block of each worker (data/README.md: the block shuffle)
    crops_per_image: int = 1  # random train crops per decoded image (decoding a big photo costs more than a crop)
    augment: bool = True  # random flips and 90-degree rotations of the train crops
    degrade_on: Literal["device", "loader"] = "device"  # where train LRs are synthesised (data/README.md)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    max_tags: int = 8
    val_crop: int = 256  # fixed center crop of each validation image
    val_batch_size: int | None = None  # None: batch_size
    val_max_samples: int | None = None  # None: every validation sample
    val_seed: int = 0
    max_skip_fraction: float = 0.05  # DataQualityError when skipped / read passes this ...
    skip_check_after: int = 200  # ... once this many samples were read (one early bad one is not fatal)
    s3_endpoint: str | None = None  # None: AWS_ENDPOINT_URL, else AWS
    retries: int = 5  # per S3 request, exponential backoff
    prefetch_factor: int = 2

    def __post_init__(self):
        if not isinstance(self.shards, str) or not self.shards.strip():
            raise ValueError("data.shards must be the shard root URL (a folder or s3://bucket/prefix holding manifest.json)")
        if self.scale < 1:
            raise ValueError(f"data.scale must be >= 1, got {self.scale}")
        for name in ("crop", "val_crop"):
            v = getattr(self, name)
            if v < self.scale or v % self.scale:
                raise ValueError(f"data.{name} must be a positive multiple of data.scale={self.scale}, got {v}")
        for name in ("batch_size", "prefetch_factor", "max_tags", "crops_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ValueError(f"data.val_batch_size must be >= 1 or null, got {self.val_batch_size}")
        if self.val_max_samples is not None and self.val_max_samples < 1:
            raise ValueError(f"data.val_max_samples must be >= 1 or null, got {self.val_max_samples}")
        for name in ("num_workers", "shuffle_buffer", "retries", "skip_check_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.degrade_on not in ("device", "loader"):
            raise ValueError(f"data.degrade_on must be \"device\" (the trainer makes the LR) or \"loader\" (the workers do), "
                             f"got {self.degrade_on!r}")
        if self.s3_endpoint is not None and not self.s3_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"data.s3_endpoint must be an http(s) URL such as http://127.0.0.1:5000, got {self.s3_endpoint!r}")
