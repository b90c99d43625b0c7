"""Batched HR -> LR degradation in torch, on any device: Real-ESRGAN's second-order model.

    hr, lr, params = synthesize(hr_BCHW, cfg, scale, seeds)     # what the loader / trainer call
    lr, params = degrade_batch(hr_BCHW, cfg, scale, seeds)      # the LR alone
    tags = degradation_tags(params, cfg.tags)                   # "strong blur", "heavy noise", "jpeg artifacts"

One integer seed per sample decides everything about that sample: its parameters are drawn on the
host (`draw`, python's random.Random) and its noise comes from a counter-based hash of (seed, round,
pixel index) computed with integer tensor ops on the image's device. So a sample's LR does not depend
on the batch it is in, on the device (CPU and CUDA agree up to float rounding: log/cos ulps, which can
move an 8-bit or JPEG rounding step) or on where in the data pipeline it is made.

The order follows RealESRGANModel.feed_data; parameters are per sample where Real-ESRGAN draws some
per batch (resize, modes, second blur, noise type, final order) and mixes batches with a 180-sample
queue to undo that -- per-sample draws need no queue. data/README.md lists every deviation.
Images are float in [0, 1]; the LR is quantised to 8-bit levels like a real input.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import jpeg_codec_differentiable
from kornia.filters import filter2d, gaussian_blur2d

from linearsr.core.util import stable_hash
from linearsr.data.config import KERNEL_TYPES, DegradationConfig, TagThresholds
from linearsr.data.degrade import bicubic_down, check_hr, quantize

KINDS = KERNEL_TYPES + ("sinc",)  # the codes of params["kernel1"], params["kernel2"]
PAD_TO = 21  # every kernel is zero-padded to 21 x 21, as in Real-ESRGAN, so a batch shares one conv
SINC_SIGMA = math.sqrt(2 * math.log(2))  # a sinc cut at omega ~ the Gaussian whose response halves there


# --------------------------------------------------------------------------- per-sample parameters


@dataclass(frozen=True)
class Kernel:
    kind: str  # one of KINDS
    size: int
    sigma_x: float = 0.0
    sigma_y: float = 0.0
    theta: float = 0.0
    beta: float = 1.0
    omega: float = 0.0  # sinc cut-off (rad / pixel)

    @property
    def sigma(self) -> float:
        """The blur strength in pixels: the larger Gaussian sigma, or SINC_SIGMA / omega for a sinc."""
        return SINC_SIGMA / self.omega if self.kind == "sinc" else max(self.sigma_x, self.sigma_y)

    def tensor(self) -> torch.Tensor:
        """The normalised kernel [PAD_TO, PAD_TO] float32 (formulas of basicsr.data.degradations)."""
        r = torch.arange(self.size, dtype=torch.float64) - (self.size - 1) / 2
        yy, xx = torch.meshgrid(r, r, indexing="ij")
        if self.kind == "sinc":
            d = torch.sqrt(xx**2 + yy**2)
            k = self.omega * torch.special.bessel_j1(self.omega * d) / (2 * math.pi * d.clamp_min(1e-12))
            k[self.size // 2, self.size // 2] = self.omega**2 / (4 * math.pi)
        else:
            c, s = math.cos(self.theta), math.sin(self.theta)
            u, v = c * xx + s * yy, -s * xx + c * yy  # coordinates along the kernel's principal axes
            q = (u / self.sigma_x) ** 2 + (v / self.sigma_y) ** 2
            if self.kind.startswith("plateau"):
                k = 1.0 / (q**self.beta + 1.0)
            else:  # iso / aniso: beta = 1
                k = torch.exp(-0.5 * q**self.beta)
        pad = (PAD_TO - self.size) // 2
        return F.pad(k / k.sum(), (pad, pad, pad, pad)).float()


@dataclass(frozen=True)
class Noise:
    gaussian: bool  # else Poisson
    gray: bool
    level: float  # Gaussian: sigma in 8-bit units; Poisson: the scale


@dataclass(frozen=True)
class Draw:
    """Everything random about one sample's degradation."""

    kernel1: Kernel
    resize1: float  # factor of the HR size
    mode1: str
    noise1: Noise
    jpeg1: float
    blur2: bool
    kernel2: Kernel
    resize2: float  # factor of the LR size
    mode2: str
    noise2: Noise
    jpeg2: float
    jpeg_last: bool  # True: [resize + sinc] then JPEG; False: JPEG then [resize + sinc]
    mode3: str
    sinc: Kernel | None  # the final sinc filter, or none


def _kernel(rng: random.Random, cfg: DegradationConfig, second: bool) -> Kernel:
    lo, hi = cfg.blur_kernel_size
    size = rng.choice([k for k in range(lo, hi + 1) if k % 2])
    if rng.random() < (cfg.sinc_prob2 if second else cfg.sinc_prob):
        omega = rng.uniform(math.pi / 3, math.pi) if size < 13 else rng.uniform(math.pi / 5, math.pi)
        return Kernel("sinc", size, omega=omega)
    kind = rng.choices(KERNEL_TYPES, cfg.kernel_prob2 if second else cfg.kernel_prob)[0]
    sigma = cfg.blur_sigma2 if second else cfg.blur_sigma
    sx = rng.uniform(*sigma)
    sy, theta = (rng.uniform(*sigma), rng.uniform(-math.pi, math.pi)) if kind.endswith("aniso") else (sx, 0.0)
    beta = 1.0
    if kind.startswith(("generalized", "plateau")):
        lo_b, hi_b = (cfg.betag_range2 if second else cfg.betag_range) if kind.startswith("generalized") \
            else (cfg.betap_range2 if second else cfg.betap_range)
        beta = rng.uniform(lo_b, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi_b)
    return Kernel(kind, size, sx, sy, theta, beta)


def _resize_factor(rng: random.Random, probs: tuple, span: tuple) -> float:
    kind = rng.choices(("up", "down", "keep"), probs)[0]
    return rng.uniform(1.0, span[1]) if kind == "up" else rng.uniform(span[0], 1.0) if kind == "down" else 1.0


def _noise(rng: random.Random, gaussian_prob: float, gray_prob: float, sigma: tuple, poisson: tuple) -> Noise:
    gaussian = rng.random() < gaussian_prob
    level = rng.uniform(*sigma) if gaussian else rng.uniform(*poisson)
    return Noise(gaussian, rng.random() < gray_prob, level)


def draw(cfg: DegradationConfig, seed: int) -> Draw:
    """The degradation parameters of one sample; the same seed always gives the same draw."""
    rng = random.Random(seed)
    k1 = _kernel(rng, cfg, second=False)
    r1, m1 = _resize_factor(rng, cfg.resize_probs, cfg.resize_range), rng.choice(cfg.resize_modes)
    n1 = _noise(rng, cfg.gaussian_noise_prob, cfg.gray_noise_prob, cfg.noise_sigma, cfg.poisson_scale)
    q1 = rng.uniform(*cfg.jpeg_quality)
    blur2, k2 = rng.random() < cfg.second_blur_prob, _kernel(rng, cfg, second=True)
    r2, m2 = _resize_factor(rng, cfg.resize_probs2, cfg.resize_range2), rng.choice(cfg.resize_modes)
    n2 = _noise(rng, cfg.gaussian_noise_prob2, cfg.gray_noise_prob2, cfg.noise_sigma2, cfg.poisson_scale2)
    q2 = rng.uniform(*cfg.jpeg_quality2)
    jpeg_last, m3 = rng.random() < 0.5, rng.choice(cfg.resize_modes)
    sinc = None
    if rng.random() < cfg.final_sinc_prob:
        lo, hi = cfg.blur_kernel_size
        sinc = Kernel("sinc", rng.choice([k for k in range(lo, hi + 1) if k % 2]), omega=rng.uniform(math.pi / 3, math.pi))
    return Draw(k1, r1, m1, n1, q1, blur2, k2, r2, m2, n2, q2, jpeg_last, m3, sinc)


# --------------------------------------------------------------------------- device-independent noise

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (bijective) on int64 tensors holding values in [0, 2^32): products stay
    below 2^63, so CPU and CUDA compute the same bits."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def normal_noise(seed: int, stream: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 numbers [shape] that depend only on (seed, stream, element index)."""
    n = math.prod(shape)
    h = stable_hash("noise", seed, stream)
    k1, k2, k3 = h & _M32, h >> 32, (h >> 16) & _M32
    i = torch.arange((n + 1) // 2, device=device, dtype=torch.int64)
    a = _mix32(_mix32(i ^ k1) ^ k2)
    b = _mix32(a ^ k3)
    u1 = ((a >> 8).float() + 0.5) * 2.0**-24  # in (0, 1)
    u2 = ((b >> 8).float() + 0.5) * 2.0**-24
    r, t = torch.sqrt(-2.0 * torch.log(u1)), (2 * math.pi) * u2  # Box-Muller: two normals per pair
    return torch.cat([r * torch.cos(t), r * torch.sin(t)])[:n].view(shape)


def _add_noise(x: torch.Tensor, noise: Noise, seed: int, stream: int) -> tuple[torch.Tensor, float]:
    """x [1, 3, h, w] + noise (clipped to [0, 1]); returns the noise std in 8-bit units as well.
    Poisson noise is Real-ESRGAN's (photon counts = 8-bit image x the next power of 2 above its number
    of distinct levels) drawn as its Gaussian limit round(N(lam, lam)) >= 0."""
    _, _, h, w = x.shape
    channels = 1 if noise.gray else 3
    z = normal_noise(seed, stream, (1, channels, h, w), x.device)
    if noise.gaussian:
        added, std = z * (noise.level / 255.0), noise.level
    else:
        img = rgb_to_grayscale(x) if noise.gray else x
        levels = (img * 255.0).round().clamp(0, 255)
        img = levels / 255.0
        vals = 2.0 ** math.ceil(math.log2(int((torch.bincount(levels.flatten().long(), minlength=256) > 0).sum())))
        lam = img * vals
        added = ((lam + lam.sqrt() * z).round().clamp_min(0) / vals - img) * noise.level
        std = noise.level * math.sqrt(float(img.mean()) / vals) * 255.0
    return (x + added.expand_as(x)).clamp(0.0, 1.0), std


# --------------------------------------------------------------------------- operations


def _filter(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample 2-D filter (kernels [B, k, k] or [1, k, k]) with reflect padding, or edge padding
    where the image is too small to reflect."""
    border = "reflect" if min(x.shape[-2:]) > kernels.shape[-1] // 2 else "replicate"
    return filter2d(x, kernels.to(x.device, x.dtype), border_type=border)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if size == tuple(x.shape[-2:]):
        return x
    kw = {} if mode in ("area", "nearest") else {"align_corners": False}
    return F.interpolate(x, size=size, mode=mode, **kw)


def _jpeg(x: torch.Tensor, quality: Sequence[float]) -> torch.Tensor:
    return jpeg_codec_differentiable(x.clamp(0.0, 1.0), torch.tensor(list(quality), dtype=x.dtype, device=x.device))


def usm_sharpen(x: torch.Tensor, weight: float = 0.5, threshold: float = 10.0) -> torch.Tensor:
    """Real-ESRGAN's USMSharp (radius 50 -> 51-tap Gaussian of sigma 8, soft threshold mask). x [B, 3, H, W]."""
    border = "reflect" if min(x.shape[-2:]) > 25 else "replicate"
    blur = gaussian_blur2d(x, (51, 51), (8.0, 8.0), border_type=border)
    residual = x - blur
    mask = ((residual.abs() * 255.0) > threshold).to(x.dtype)
    soft = gaussian_blur2d(mask, (51, 51), (8.0, 8.0), border_type=border)
    sharp = (x + weight * residual).clamp(0.0, 1.0)
    return soft * sharp + (1 - soft) * x


# --------------------------------------------------------------------------- the pipeline


def _param_tensors(draws: list[Draw], noise: list[tuple[float, float]]) -> dict[str, torch.Tensor]:
    def col(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype)

    blur2 = [d.kernel2.sigma / d.resize1 if d.blur2 else 0.0 for d in draws]  # in HR pixels
    return {
        "blur": torch.maximum(col([d.kernel1.sigma for d in draws]), col(blur2)),
        "noise": col([math.hypot(a, b) for a, b in noise]),
        "jpeg": col([min(d.jpeg1, d.jpeg2) for d in draws]),
        "blur1": col([d.kernel1.sigma for d in draws]), "blur2": col(blur2),
        "kernel1": col([KINDS.index(d.kernel1.kind) for d in draws], torch.int64),
        "kernel2": col([KINDS.index(d.kernel2.kind) if d.blur2 else -1 for d in draws], torch.int64),
        "resize1": col([d.resize1 for d in draws]), "resize2": col([d.resize2 for d in draws]),
        "noise1": col([a for a, _ in noise]), "noise2": col([b for _, b in noise]),
        "poisson1": col([not d.noise1.gaussian for d in draws], torch.bool),
        "poisson2": col([not d.noise2.gaussian for d in draws], torch.bool),
        "jpeg1": col([d.jpeg1 for d in draws]), "jpeg2": col([d.jpeg2 for d in draws]),
        "sinc": col([d.sinc.omega if d.sinc else 0.0 for d in draws]),  # final sinc cut-off, 0 = none
    }


def degrade_batch(hr: torch.Tensor, cfg: DegradationConfig, scale: int,
                  seeds: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HR [B, 3, H, W] in [0, 1] (any device) -> (LR [B, 3, H/s, W/s] on that device, params).

    params: per-sample CPU tensors [B]; always "blur" (strongest blur sigma of both rounds in HR
    pixels, 0 = none), "noise" (std of the added noise in 8-bit units, both rounds, root of the sum of
    squares) and "jpeg" (lowest JPEG quality, 100 = none); "realistic" adds the per-round values."""
    check_hr(hr, scale, batched=True)
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    if len(seeds) != hr.shape[0]:
        raise ValueError(f"degrade_batch needs one seed per sample: {hr.shape[0]} images, {len(seeds)} seeds")
    b, _, big_h, big_w = hr.shape
    if cfg.mode == "bicubic":
        return bicubic_down(hr, scale), {"blur": torch.zeros(b), "noise": torch.zeros(b), "jpeg": torch.full((b,), 100.0)}
    h, w = big_h // scale, big_w // scale
    draws = [draw(cfg, s) for s in seeds]
    x = _filter(hr.float(), torch.stack([d.kernel1.tensor() for d in draws]))
    outs, noise = [], []
    for i, d in enumerate(draws):  # the image sizes part here: one sample at a time until the final resize
        xi = _resize(x[i:i + 1], (int(big_h * d.resize1), int(big_w * d.resize1)), d.mode1)
        xi, n1 = _add_noise(xi, d.noise1, seeds[i], 1)
        xi = _jpeg(xi, [d.jpeg1])
        if d.blur2:
            xi = _filter(xi, d.kernel2.tensor()[None])
        xi = _resize(xi, (int(h * d.resize2), int(w * d.resize2)), d.mode2)  # relative to the LR size
        xi, n2 = _add_noise(xi, d.noise2, seeds[i], 2)
        if not d.jpeg_last:
            xi = _jpeg(xi, [d.jpeg2])
        outs.append(_resize(xi, (h, w), d.mode3))
        noise.append((n1, n2))
    pulse = Kernel("sinc", 1, omega=math.pi).tensor()  # a 1-tap kernel: the identity
    x = _filter(torch.cat(outs), torch.stack([d.sinc.tensor() if d.sinc else pulse for d in draws]))
    last = [i for i, d in enumerate(draws) if d.jpeg_last]
    if last:
        x[last] = _jpeg(x[last], [draws[i].jpeg2 for i in last])
    return quantize(x), _param_tensors(draws, noise)


def synthesize(hr: torch.Tensor, cfg: DegradationConfig, scale: int,
               seeds: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(HR target, LR, params) of a batch: the HR is unsharp-masked first when cfg.usm_hr (the LR is
    then made from the sharpened HR, as Real-ESRNet's gt_usm)."""
    if cfg.usm_hr:
        hr = usm_sharpen(hr.float())
    lr, params = degrade_batch(hr, cfg, scale, seeds)
    return hr, lr, params


def degrade(hr: torch.Tensor, cfg: DegradationConfig, scale: int, seed: int) -> torch.Tensor:
    """One image [3, H, W] -> its LR [3, H/s, W/s] (the batch of one of `degrade_batch`)."""
    check_hr(hr, scale, batched=False)
    return degrade_batch(hr[None], cfg, scale, [seed])[0][0]


def degradation_tags(params: dict[str, torch.Tensor], thresholds: TagThresholds) -> list[list[str]]:
    """Per sample, the degradation-aware tags its parameters earn (thresholds: data.degradation.tags)."""
    out = []
    for blur, noise, quality in zip(params["blur"].tolist(), params["noise"].tolist(), params["jpeg"].tolist()):
        tags = []
        if blur >= thresholds.blur:
            tags.append("strong blur")
        if noise >= thresholds.noise:
            tags.append("heavy noise")
        if quality <= thresholds.jpeg:
            tags.append("jpeg artifacts")
        out.append(tags)
    return out

