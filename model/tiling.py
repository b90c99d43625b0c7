"""`upscale_image`: super-resolve one image, in overlapping tiles when it is large.

Memory is bounded by the tile: the network never sees more than `tile x tile` LR pixels
(`(tile*scale)^2` HR pixels). Tiles overlap by `overlap` LR pixels and are blended with
cosine ramps that sum to one across each overlap, so seams do not show. The noise is one
seeded draw over the whole image's latent grid, sliced per tile, so a tile sees the same
noise as the untiled run does at the same place."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from linearsr.model.network import LinearSR
from linearsr.model.sampler import MoE, as_moe, sample


def tile_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size): consecutive tiles overlap by
    at least `overlap`, every start is a multiple of `align`, the last tile ends at or after size."""
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride))
    last = (size - tile) // align * align
    if last + tile < size:  # the aligned-down last start leaves a strip: cover it (tile may exceed the edge)
        last += align
    if last > starts[-1]:
        starts.append(last)
    return starts


def ramp(length: int, ramp_in: int, ramp_out: int) -> torch.Tensor:
    """1-D blending weight [length]: cosine rise over the first ramp_in samples and fall over the
    last ramp_out; 1 elsewhere. Rise and fall of the same width sum to 1 when they overlap."""
    w = torch.ones(length, dtype=torch.float64)
    for n, sl, flip in ((ramp_in, slice(0, ramp_in), False), (ramp_out, slice(length - ramp_out, length), True)):
        if n > 0:
            r = torch.sin(0.5 * math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n) ** 2
            w[sl] = w[sl] * (r.flip(0) if flip else r)
    return w.float()


def latent_shape(model: LinearSR, h: int, w: int) -> tuple[int, int, int]:
    """(C, H', W') of x_t for an LR image of h x w (the HR grid padded to the model's multiple)."""
    s, m, f = model.cfg.scale, model.multiple, model.ae.factor
    return model.ae.channels, math.ceil(h * s / m) * m // f, math.ceil(w * s / m) * m // f


@torch.no_grad()
def upscale_image(
    model_or_moe: LinearSR | MoE,
    lr: torch.Tensor,
    tags: list[str] | None = None,
    steps: int = 1,
    method: str = "euler",
    guidance: float = 1.0,
    seed: int = 0,
    tile: int | None = 256,
    overlap: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """lr: [3, h, w] (or [1, 3, h, w]) in [0, 1] -> [3, h*s, w*s] in [0, 1].
    tile: largest LR tile side (None or 0: one pass over the whole image)."""
    moe = as_moe(model_or_moe)
    lr = lr[0] if lr.dim() == 4 else lr
    device = next(moe.parameters()).device
    _, h, w = lr.shape
    expert = moe.experts[0]
    s, m, f = expert.cfg.scale, expert.multiple, expert.ae.factor
    tag_lists = [list(tags or [])]
    if not tile or (h <= tile and w <= tile):
        return sample(moe, lr[None].to(device), tag_lists, steps, method, guidance, seed).image[0].cpu()
    if tile < 8 or not 0 <= overlap < tile // 2:
        raise ValueError(f"tiling needs tile >= 8 and 0 <= overlap < tile/2, got tile={tile}, overlap={overlap}")
    align = m // math.gcd(m, s)  # LR offsets whose HR offsets are multiples of the latent grid
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *latent_shape(expert, h, w)), generator=gen)
    out = torch.zeros(3, h * s, w * s)
    weight = torch.zeros(1, h * s, w * s)
    boxes = [(y, x) for y in tile_starts(h, tile, overlap, align) for x in tile_starts(w, tile, overlap, align)]
    for y0, x0 in tqdm(boxes, desc="tiles", unit="tile", disable=not progress, leave=False):
        y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
        crop = lr[:, y0:y1, x0:x1][None].to(device)
        _, ch, cw = latent_shape(expert, y1 - y0, x1 - x0)
        ly, lx = y0 * s // f, x0 * s // f
        tile_noise = noise[..., ly : ly + ch, lx : lx + cw]
        img = sample(moe, crop, tag_lists, steps, method, guidance, seed, noise=tile_noise).image[0].cpu()
        ov = overlap * s
        wy = ramp(img.shape[1], ov if y0 > 0 else 0, ov if y1 < h else 0)
        wx = ramp(img.shape[2], ov if x0 > 0 else 0, ov if x1 < w else 0)
        wt = wy[:, None] * wx[None, :]
        out[:, y0 * s : y1 * s, x0 * s : x1 * s] += img * wt
        weight[:, y0 * s : y1 * s, x0 * s : x1 * s] += wt
    return (out / weight).clamp(0, 1)
