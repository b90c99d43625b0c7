"""The plain image operations every stage shares: 8-bit quantisation, modcrop, bicubic x1/s.

"bicubic" is `bicubic_down`: antialiased bicubic with a = -0.5, i.e. Pillow's BICUBIC (not
MATLAB's imresize), the usual "bicubic x s" of SR benchmarks. The realistic (Real-ESRGAN)
degradation is `linearsr.data.degradations`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def check_hr(hr: torch.Tensor, scale: int, batched: bool | None = None) -> None:
    """ValueError unless hr is [3, H, W] (batched False), [B, 3, H, W] (True) or either (None), H, W divisible by scale."""
    dims = {None: (3, 4), False: (3,), True: (4,)}[batched]
    if hr.dim() not in dims or hr.shape[-3] != 3:
        want = " or ".join({3: "[3, H, W]", 4: "[B, 3, H, W]"}[d] for d in dims)
        raise ValueError(f"HR image must be a {want} tensor, got shape {list(hr.shape)}")
    h, w = hr.shape[-2:]
    if scale < 1 or h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by scale {scale}; crop it first (modcrop)")


def modcrop(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop the bottom/right border so H and W are multiples of scale. hr: [..., H, W]."""
    h, w = hr.shape[-2:]
    return hr[..., : h - h % scale, : w - w % scale]


def bicubic_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Plain antialiased bicubic down-scale by an integer factor, quantised to 8 bits.
    hr: [3, H, W] or [B, 3, H, W] in [0, 1] -> [.., 3, H/s, W/s] on the same device."""
    check_hr(hr, scale)
    x = hr[None] if hr.dim() == 3 else hr
    h, w = x.shape[-2:]
    lr = F.interpolate(x.float(), size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    lr = quantize(lr)
    return lr[0] if hr.dim() == 3 else lr
