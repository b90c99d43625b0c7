"""Typed settings of the data pipeline: where the shards are, crops, batching, degradation.

Both dataclasses are frozen and validate in `__post_init__`; a bad value raises ValueError
naming the key as it appears in the experiment config (`data.crop`, `data.degradation.jpeg_quality`).
No credentials live here: S3 keys come from the environment / AWS config only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest")


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


@dataclass(frozen=True)
class DegradationConfig:
    """HR -> LR. "realistic" follows Real-ESRGAN's second-order model (blur -> random resize ->
    Gaussian/Poisson noise -> JPEG, optionally a second round, final resize to exactly H/s x W/s);
    "bicubic" is a plain antialiased bicubic down-scale (benchmark-style evaluation).
    Noise sigmas are in 8-bit units (x/255); resize ranges are factors of the current size."""

    mode: Literal["realistic", "bicubic"] = "realistic"
    # first round
    blur_prob: float = 1.0
    blur_kernel_size: tuple[int, int] = (7, 21)  # odd sizes drawn from this range
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    anisotropic_prob: float = 0.5
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    gaussian_noise_prob: float = 0.5  # else Poisson noise
    gray_noise_prob: float = 0.4
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    jpeg_quality: tuple[int, int] = (30, 95)
    # second round
    second_order_prob: float = 0.5
    blur_prob2: float = 0.8
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    noise_sigma2: tuple[float, float] = (1.0, 25.0)
    poisson_scale2: tuple[float, float] = (0.05, 2.5)
    jpeg_quality2: tuple[int, int] = (30, 95)

    def __post_init__(self):
        p = "data.degradation."
        for name in ("blur_prob", "anisotropic_prob", "gaussian_noise_prob", "gray_noise_prob",
                     "second_order_prob", "blur_prob2"):
            _check_prob(p + name, getattr(self, name))
        _check_range(p + "blur_kernel_size", self.blur_kernel_size, 3, 41)
        if self.blur_kernel_size[0] == self.blur_kernel_size[1] and self.blur_kernel_size[0] % 2 == 0:
            raise ValueError(f"{p}blur_kernel_size must include an odd size, got {list(self.blur_kernel_size)}")
        for name in ("blur_sigma", "blur_sigma2", "noise_sigma", "noise_sigma2", "poisson_scale", "poisson_scale2"):
            _check_range(p + name, getattr(self, name), 0.0)
        if self.blur_sigma[0] <= 0 or self.blur_sigma2[0] <= 0:
            raise ValueError(f"{p}blur_sigma and blur_sigma2 must be > 0, got {list(self.blur_sigma)}, {list(self.blur_sigma2)}")
        for name in ("resize_range", "resize_range2"):
            lo, hi = getattr(self, name)
            _check_range(p + name, (lo, hi), 0.01, 4.0)
            if not lo <= 1.0 <= hi:
                raise ValueError(f"{p}{name} must contain 1.0 (down-scale below it, up-scale above), got {[lo, hi]}")
        if len(self.resize_probs) != 3 or any(x < 0 for x in self.resize_probs) or abs(sum(self.resize_probs) - 1) > 1e-6:
            raise ValueError(f"{p}resize_probs must be three probabilities (up, down, keep) summing to 1, got {list(self.resize_probs)}")
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
    shuffle_buffer: int = 256  # crops held in each worker's shuffle buffer
    crops_per_image: int = 1  # random train crops per decoded image (decoding a big photo costs more than a crop)
    augment: bool = True  # random flips and 90-degree rotations of the train crops
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
        if self.s3_endpoint is not None and not self.s3_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"data.s3_endpoint must be an http(s) URL such as http://127.0.0.1:5000, got {self.s3_endpoint!r}")
