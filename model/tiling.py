"""`upscale_image`: super-resolve one image, in tiles when it is larger than `tile` LR pixels.

Two ways to tile (`tile_mode`):
- exact (model/tiled.py): each network evaluation runs layer by layer over token tiles, with
  every linear-attention state summed over all tiles first, so the output is the untiled one
  (to fp32 rounding). The sampler's state (x_t, cond, noise: a few channels per pixel) and the
  autoencoder stay whole-image: pixel-unshuffle is per pixel; a latent autoencoder's encoder and
  decoder then run on the whole image (they are convolutions, not tiled here).
- blend: the whole sampler runs per tile of at most `tile x tile` LR pixels, tiles overlap by
  `overlap` LR pixels and are blended with cosine ramps that sum to one across each overlap.
  Each tile sees only itself as "global" context, so the result differs from the untiled one,
  most near seams. For models where exactness does not hold (the GLA mixer, softmax attention)
  and to bound a latent autoencoder's memory too. The noise is one seeded draw over the whole
  latent grid, sliced per tile, so a tile sees the noise the untiled run has at the same place.
- auto (default): exact where it holds, else blend.
Same-shaped tiles are evaluated `batch` at a time."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from linearsr.model.network import LinearSR
from linearsr.model.sampler import MoE, as_moe, sample
from linearsr.model.tiled import ExactTiling, exact_tiling_unsupported

TILE_MODES = ("auto", "exact", "blend")


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


def check_tiling(tile: int | None, overlap: int, mode: str, batch: int) -> None:
    """One sentence for an impossible tiling request, before any work. The overlap matters only
    to blended tiles: check again with the resolved mode (`resolve_tile_mode`) once the model is known."""
    if mode not in TILE_MODES:
        raise ValueError(f"tile mode {mode!r} is not one of {', '.join(TILE_MODES)}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1 tile, got {batch}")
    if tile and tile < 8:
        raise ValueError(f"--tile {tile}: tiles need tile >= 8 LR pixels, or --tile 0 for no tiling")
    if tile and mode == "blend" and not 0 <= overlap < tile // 2:
        raise ValueError(f"--tile {tile} --overlap {overlap}: blended tiles need tile >= 8 and 0 <= overlap < tile/2 "
                         f"(e.g. --tile {max(8, 2 * overlap + 2)}), or --tile 0 for no tiling")


def resolve_tile_mode(model: LinearSR, mode: str) -> str:
    """auto -> exact where it holds for this model, else blend; exact where it does not: ValueError."""
    why = exact_tiling_unsupported(model.cfg)
    if mode == "exact" and why:
        raise ValueError(f"--tile-mode exact does not hold for this bundle: {why}; use --tile-mode blend")
    return mode if mode != "auto" else ("blend" if why else "exact")


def tile_tokens(model: LinearSR, tile: int) -> int:
    """An LR tile side in pixels -> the token tile side it covers (at least 1)."""
    return max(1, tile * model.cfg.scale // (model.ae.factor * model.cfg.patch_size))


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
    tile_mode: str = "auto",
    batch: int = 1,
    net=None,
    progress: bool = False,
) -> torch.Tensor:
    """lr: [3, h, w] (or [1, 3, h, w]) in [0, 1] -> [3, h*s, w*s] in [0, 1].
    tile: largest LR tile side (None or 0: one pass over the whole image); tile_mode: auto,
    exact or blend; batch: tiles evaluated together; net: replaces each untiled network
    evaluation (e.g. a compiled forward; exact tiling brings its own)."""
    check_tiling(tile, overlap, tile_mode, batch)
    moe = as_moe(model_or_moe)
    lr = lr[0] if lr.dim() == 4 else lr
    device = next(moe.parameters()).device
    _, h, w = lr.shape
    expert = moe.experts[0]
    tag_lists = [list(tags or [])]
    if not tile or (h <= tile and w <= tile):
        return sample(moe, lr[None].to(device), tag_lists, steps, method, guidance, seed, net=net).image[0].cpu()
    mode = resolve_tile_mode(expert, tile_mode)
    check_tiling(tile, overlap, mode, batch)
    if mode == "exact":
        tiled = net if isinstance(net, ExactTiling) else ExactTiling(tile_tokens(expert, tile), batch)
        return sample(moe, lr[None].to(device), tag_lists, steps, method, guidance, seed, net=tiled).image[0].cpu()
    return _blend(moe, lr, tag_lists[0], steps, method, guidance, seed, tile, overlap, batch, net, progress)


def _blend(moe: MoE, lr, tags, steps, method, guidance, seed, tile, overlap, batch, net, progress) -> torch.Tensor:
    device = next(moe.parameters()).device
    _, h, w = lr.shape
    expert = moe.experts[0]
    s, m, f = expert.cfg.scale, expert.multiple, expert.ae.factor
    align = m // math.gcd(m, s)  # LR offsets whose HR offsets are multiples of the latent grid
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *latent_shape(expert, h, w)), generator=gen)
    out = torch.zeros(3, h * s, w * s)
    weight = torch.zeros(1, h * s, w * s)
    boxes = [(y, x, min(y + tile, h), min(x + tile, w))
             for y in tile_starts(h, tile, overlap, align) for x in tile_starts(w, tile, overlap, align)]
    same: dict[tuple[int, int], list] = {}
    for box in boxes:
        same.setdefault((box[2] - box[0], box[3] - box[1]), []).append(box)
    groups = [g[i : i + batch] for g in same.values() for i in range(0, len(g), batch)]
    bar = tqdm(total=len(boxes), desc="tiles", unit="tile", disable=not progress, leave=False)
    for group in groups:
        crops = torch.stack([lr[:, y0:y1, x0:x1] for y0, x0, y1, x1 in group]).to(device)
        _, ch, cw = latent_shape(expert, group[0][2] - group[0][0], group[0][3] - group[0][1])
        tile_noise = torch.cat([noise[..., y0 * s // f : y0 * s // f + ch, x0 * s // f : x0 * s // f + cw]
                                for y0, x0, _, _ in group])
        images = sample(moe, crops, [tags] * len(group), steps, method, guidance, seed, noise=tile_noise, net=net).image.cpu()
        for (y0, x0, y1, x1), img in zip(group, images):
            ov = overlap * s
            wy = ramp(img.shape[1], ov if y0 > 0 else 0, ov if y1 < h else 0)
            wx = ramp(img.shape[2], ov if x0 > 0 else 0, ov if x1 < w else 0)
            wt = wy[:, None] * wx[None, :]
            out[:, y0 * s : y1 * s, x0 * s : x1 * s] += img * wt
            weight[:, y0 * s : y1 * s, x0 * s : x1 * s] += wt
        bar.update(len(group))
    bar.close()
    return (out / weight).clamp(0, 1)
