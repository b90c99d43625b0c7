"""HR -> LR degradation, run in the DataLoader workers and by `linearsr eval`.

`degrade` is seeded: the same (image, config, scale, seed) always gives the same LR, so the
validation set and the evaluation set see a fixed degradation. Images are float tensors in
[0, 1], `[3, H, W]`; the LR is `[3, H/s, W/s]`, quantised to 8-bit levels like a real input.

"realistic" is Real-ESRGAN's second-order model without the sinc filter:
    blur (isotropic / anisotropic Gaussian) -> resize (random up/down, random interpolation)
    -> Gaussian or Poisson noise (colour or gray) -> JPEG
    [-> second round: blur -> resize -> noise]  -> resize to H/s x W/s and JPEG, in random order
"bicubic" is `bicubic_down`: antialiased bicubic with a = -0.5, i.e. Pillow's BICUBIC
(not MATLAB's imresize), the usual "bicubic x s" of SR benchmarks.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import signal

from linearsr.data.config import DegradationConfig


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def _check(hr: torch.Tensor, scale: int) -> None:
    if hr.dim() not in (3, 4) or hr.shape[-3] != 3:
        raise ValueError(f"HR image must be a [3, H, W] or [B, 3, H, W] tensor, got shape {list(hr.shape)}")
    h, w = hr.shape[-2:]
    if scale < 1 or h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by scale {scale}; crop it first (modcrop)")


def modcrop(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop the bottom/right border so H and W are multiples of scale. hr: [..., H, W]."""
    h, w = hr.shape[-2:]
    return hr[..., : h - h % scale, : w - w % scale]


def bicubic_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Plain antialiased bicubic down-scale by an integer factor, quantised to 8 bits.
    hr: [3, H, W] or [B, 3, H, W] in [0, 1] -> [.., 3, H/s, W/s]."""
    _check(hr, scale)
    x = hr[None] if hr.dim() == 3 else hr
    h, w = x.shape[-2:]
    lr = F.interpolate(x.float(), size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    lr = quantize(lr)
    return lr[0] if hr.dim() == 3 else lr


# --------------------------------------------------------------------------- random helpers


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _chance(g: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=g, dtype=torch.float64).item() < p


def _choice(g: torch.Generator, options):
    return options[int(torch.randint(len(options), (), generator=g))]


# --------------------------------------------------------------------------- operations


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """A normalised (possibly rotated anisotropic) Gaussian kernel [size, size]."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy  # coordinates in the kernel's principal axes
    k = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (k / k.sum()).float()


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel 2-D filter with reflect padding (edge where the image is too small). Through
    FFT: ~10x faster than a depthwise conv2d for these 7..21 px kernels on CPU. The kernels are
    point-symmetric, so convolution and correlation agree."""
    pad = kernel.shape[-1] // 2
    mode = "reflect" if pad < min(x.shape[-2:]) else "edge"
    xp = np.pad(x.numpy(), ((0, 0), (pad, pad), (pad, pad)), mode=mode)
    out = signal.fftconvolve(xp, kernel.numpy()[None].astype(np.float64), mode="valid")
    return torch.from_numpy(out.astype(np.float32))


def _blur(x: torch.Tensor, cfg: DegradationConfig, sigma: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    lo, hi = cfg.blur_kernel_size
    sizes = [k for k in range(lo, hi + 1) if k % 2 == 1]
    size = _choice(g, sizes)
    if _chance(g, cfg.anisotropic_prob):
        sx, sy, theta = _uniform(g, *sigma), _uniform(g, *sigma), _uniform(g, -math.pi, math.pi)
    else:
        sx = sy = _uniform(g, *sigma)
        theta = 0.0
    return _filter(x, gaussian_kernel(size, sx, sy, theta))


def _resize_to(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    kw = {} if mode in ("area", "nearest") else {"align_corners": False}
    return F.interpolate(x[None], size=size, mode=mode, **kw)[0].clamp(0.0, 1.0)


def _random_resize(x: torch.Tensor, cfg: DegradationConfig, rng: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    u = _uniform(g, 0.0, 1.0)
    p_up, p_down, _ = cfg.resize_probs
    if u < p_up:
        factor = _uniform(g, 1.0, rng[1])
    elif u < p_up + p_down:
        factor = _uniform(g, rng[0], 1.0)
    else:
        factor = 1.0
    mode = _choice(g, cfg.resize_modes)
    h, w = x.shape[-2:]
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    return x if size == (h, w) else _resize_to(x, size, mode)


def _noise(x: torch.Tensor, cfg: DegradationConfig, sigma: tuple[float, float], poisson: tuple[float, float],
           g: torch.Generator) -> torch.Tensor:
    gray = _chance(g, cfg.gray_noise_prob)
    if _chance(g, cfg.gaussian_noise_prob):
        s = _uniform(g, *sigma) / 255.0
        shape = (1, *x.shape[1:]) if gray else x.shape
        noise = torch.randn(shape, generator=g, dtype=x.dtype) * s
    else:
        scale = _uniform(g, *poisson)
        base = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None] if gray else x
        base = base.clamp(0.0, 1.0).numpy() * 255.0  # photon counts of an 8-bit image
        rng = np.random.default_rng(int(torch.randint(2**62, (), generator=g)))  # 3x faster than torch.poisson
        noise = torch.from_numpy(((rng.poisson(base) - base) / 255.0 * scale).astype(np.float32))
    return (x + noise).clamp(0.0, 1.0)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip through Pillow (4:2:0). x: [3, H, W] in [0, 1]."""
    arr = (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).to(x.dtype) / 255.0


def _random_jpeg(x: torch.Tensor, quality: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    return jpeg(x, int(torch.randint(quality[0], quality[1] + 1, (), generator=g)))


# --------------------------------------------------------------------------- the pipeline


def degrade(hr: torch.Tensor, cfg: DegradationConfig, scale: int, generator: torch.Generator | None = None,
            seed: int | None = None) -> torch.Tensor:
    """HR [3, H, W] in [0, 1] -> LR [3, H/scale, W/scale] in [0, 1] (8-bit levels).

    Randomness comes only from `generator` (or a fresh one seeded with `seed`): same seed,
    same LR. H and W must be multiples of scale."""
    _check(hr, scale)
    if hr.dim() != 3:
        raise ValueError(f"degrade takes one image [3, H, W]; got {list(hr.shape)} (loop over the batch)")
    if cfg.mode == "bicubic":
        return bicubic_down(hr, scale)
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(int(torch.randint(2**62, ()).item()) if seed is None else int(seed))
    g = generator
    h, w = hr.shape[-2:]
    x = hr.float()
    # first round
    if _chance(g, cfg.blur_prob):
        x = _blur(x, cfg, cfg.blur_sigma, g)
    x = _random_resize(x, cfg, cfg.resize_range, g)
    x = _noise(x, cfg, cfg.noise_sigma, cfg.poisson_scale, g)
    x = _random_jpeg(x, cfg.jpeg_quality, g)
    target = (h // scale, w // scale)
    if _chance(g, cfg.second_order_prob):
        if _chance(g, cfg.blur_prob2):
            x = _blur(x, cfg, cfg.blur_sigma2, g)
        x = _random_resize(x, cfg, cfg.resize_range2, g)
        x = _noise(x, cfg, cfg.noise_sigma2, cfg.poisson_scale2, g)
        mode = _choice(g, cfg.resize_modes)
        if _chance(g, 0.5):
            x = _random_jpeg(_resize_to(x, target, mode), cfg.jpeg_quality2, g)
        else:
            x = _resize_to(_random_jpeg(x, cfg.jpeg_quality2, g), target, mode)
    else:
        x = _resize_to(x, target, _choice(g, cfg.resize_modes))
    return quantize(x)
