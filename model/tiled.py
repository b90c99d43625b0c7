"""Exact tiled evaluation of the LinearSR network: the numbers of one pass, in bounded memory.

Why tiling can be exact here: a linear-attention layer sees the rest of the image only through
two sums over its tokens, kv = sum phi(k)^T v and z = sum phi(k). Summed tile by tile they are
the whole image's sums, so each tile reads the same global context as in one pass. Everything
else in a block is per token except the Mix-FFN's 3x3 depthwise conv, which needs one token of
halo around a tile (halo tokens are recomputed and their outputs dropped). Per block:

    pass 1, every tile:  state += attn.state(mixer_input(x_tile))
    pass 2, every tile:  y_tile = local(x_tile+halo + gate * attn.read(mixer_input(x_tile+halo), state))

x and y hold the whole image's tokens ([B, H, W, C] each); everything else lives for one group
of at most `batch` same-shaped tiles. Peak memory: those two layers plus one group's
intermediates, instead of every intermediate of the whole image (`make bench-infer` measures it).

Exact for model.mixer = "linear" with any backend but sdpa: softmax has no additive state, and
the GLA mixer's decay makes its state depend on position; those use blend tiling
(model/tiling.py). The fla / fused backends compute the same sums; here state and read run in
torch. Agreement with one pass is fp32 rounding (the sums are added in another order)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearSR

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 on the token grid


def exact_tiling_unsupported(cfg: ModelConfig) -> str | None:
    """Why exact tiling does not hold for this model, or None when it does."""
    if cfg.mixer != "linear":
        return f"model.mixer={cfg.mixer!r} has no additive global state (its decay depends on position)"
    if cfg.attention == "sdpa":
        return "softmax attention (model.attention='sdpa') has no additive global state"
    return None


def splits(size: int, tile: int) -> list[tuple[int, int]]:
    """[0, size) cut into ceil(size / tile) near-equal spans (at most two distinct lengths)."""
    n = math.ceil(size / tile)
    base, extra = divmod(size, n)
    edges = [0]
    for i in range(n):
        edges.append(edges[-1] + base + (i < extra))
    return list(zip(edges[:-1], edges[1:]))


def _rep(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, ...] -> [n * B, ...]: per-image tensors for n stacked tiles (tile-major)."""
    return x if n == 1 else x.repeat(n, *([1] * (x.dim() - 1)))


def _gather(x_BHWC: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
    """Same-shaped boxes of the token grid stacked tile-major: [n * B, h * w, C]."""
    return torch.cat([x_BHWC[:, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes]).flatten(1, 2)


def _crops(a_BCHW: torch.Tensor, boxes: list[Box], p: int) -> torch.Tensor:
    """The pixels under same-shaped token boxes (patch size p), stacked tile-major: [n * B, C, h*p, w*p]."""
    return torch.cat([a_BCHW[..., y0 * p : y1 * p, x0 * p : x1 * p] for y0, y1, x0, x1 in boxes])


class ExactTiling:
    """A `net` for `sample()` / `LinearSR.velocity`: one network evaluation, tile by tile.
    tile: tile side in tokens; batch: tiles evaluated together; compile: torch.compile the tile steps."""

    def __init__(self, tile: int, batch: int = 1, compile: bool = False):
        if tile < 1 or batch < 1:
            raise ValueError(f"exact tiling needs tile >= 1 token and batch >= 1, got tile={tile}, batch={batch}")
        self.tile, self.batch = tile, batch
        steps = (_embed_step, _state_step, _block_step, _head_step)
        self._embed, self._state, self._block, self._head = (torch.compile(f, dynamic=True) if compile else f for f in steps)

    def groups(self, boxes: list[Box], key) -> list[list[Box]]:
        """Boxes with the same key (shape), in runs of at most `batch`."""
        by_key: dict = defaultdict(list)
        for box in boxes:
            by_key[key(box)].append(box)
        return [same[i : i + self.batch] for same in by_key.values() for i in range(0, len(same), self.batch)]

    @torch.no_grad()
    def __call__(self, model: LinearSR, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, tags) -> torch.Tensor:
        why = exact_tiling_unsupported(model.cfg)
        if why:
            raise ValueError(f"exact tiling does not hold for this model: {why}; use blend tiling (--tile-mode blend)")
        num_b, _, h, w = x_t.shape
        p = model.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent grid {h}x{w} is not a multiple of model.patch_size={p}; pad the image first")
        gh, gw = h // p, w // p
        boxes = [(y0, y1, x0, x1) for y0, y1 in splits(gh, self.tile) for x0, x1 in splits(gw, self.tile)]
        shape = lambda b: (b[1] - b[0], b[3] - b[2])  # noqa: E731
        plain = self.groups(boxes, shape)
        halo = {b: (max(b[0] - 1, 0), min(b[1] + 1, gh), max(b[2] - 1, 0), min(b[3] + 1, gw)) for b in boxes}
        rel = lambda b: (shape(halo[b]), b[0] - halo[b][0], b[2] - halo[b][2], shape(b))  # noqa: E731
        haloed = self.groups(boxes, rel)

        c_skip, c_out, c_in = model.preconditioning(t)
        t_emb, t_mod, tag_tok, tag_mask = model.conditioning(t, tags)
        x = torch.empty(num_b, gh, gw, model.cfg.width, dtype=model.patch_embed.weight.dtype, device=x_t.device)
        for group in plain:
            tok = self._embed(model, _crops(x_t, group, p), _crops(cond, group, p), _rep(c_in, len(group)))
            for (y0, y1, x0, x1), part in zip(group, tok.chunk(len(group))):
                x[:, y0:y1, x0:x1] = part
        for block in model.blocks:
            mod = block.modulation(t_mod)
            state = None
            for group in plain:
                n = len(group)
                kv, z = self._state(block, _gather(x, group), tuple(_rep(m, n) for m in mod))
                part = kv.view(n, num_b, *kv.shape[1:]).sum(0), z.view(n, num_b, *z.shape[1:]).sum(0)
                state = part if state is None else (state[0] + part[0], state[1] + part[1])
            y = torch.empty_like(x)
            for group in haloed:
                n, ((rh, rw), dy, dx, (th, tw)) = len(group), rel(group[0])
                out = self._block(block, _gather(x, [halo[b] for b in group]), (rh, rw), tuple(_rep(m, n) for m in mod),
                                  tuple(_rep(s, n) for s in state), _rep(tag_tok, n), _rep(tag_mask, n))
                out = out.view(n * num_b, rh, rw, -1)[:, dy : dy + th, dx : dx + tw]
                for (y0, y1, x0, x1), part in zip(group, out.chunk(n)):
                    y[:, y0:y1, x0:x1] = part
            x = y
        v = torch.empty_like(x_t)
        for group in plain:
            n, (th, tw) = len(group), shape(group[0])
            out = self._head(model, _gather(x, group), (th, tw), _rep(t_emb, n))
            for (y0, y1, x0, x1), part in zip(group, out.chunk(n)):
                sl = (..., slice(y0 * p, y1 * p), slice(x0 * p, x1 * p))
                v[sl] = (c_skip * x_t[sl] + c_out * part).to(x_t.dtype)
        return v


# The tile steps: module-level so torch.compile reuses one graph for every block and expert.
def _embed_step(model, x_t, cond, c_in):
    """Pixels of stacked tiles [n*B, C, h*p, w*p] -> tokens [n*B, h, w, C_model]."""
    return model.embed(x_t, cond, c_in).permute(0, 2, 3, 1)


def _state_step(block, x, mod):
    return block.attn.state(block.mixer_input(x, mod))


def _block_step(block, x, hw, mod, state, tags, tag_mask):
    x = x + mod[2][:, None] * block.attn.read(block.mixer_input(x, mod), state)
    return block.local(x, hw, mod, tags, tag_mask)


def _head_step(model, x, hw, t_emb):
    return model.head(x, hw, t_emb)
