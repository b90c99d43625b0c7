"""LinearSR: a linear-attention DiT that predicts the flow velocity of an SR residual.

Data path (B images, HR grid H x W, autoencoder factor f, patch p):
    lr [B,3,h,w] --bicubic x scale--> up [B,3,H,W] --encode--> cond [B,C,H/f,W/f]
    x0 = (enc(hr) - cond) * residual_scale      (with cfg.residual; a zero x0 is bicubic)
    x_t = (1-t) x0 + t eps;  the net sees concat(c_in x_t, cond) -> patch embed -> blocks -> v
Blocks (SANA-style): adaLN-single time modulation, global ReLU linear attention, tag
cross-attention (softmax over the null token + <= max_tags tags; in every `cross_attn_every`-th
block), Mix-FFN; optionally (`tag_pool`) a gated mean of the tag tokens joins the time embedding. No positional
embedding: the depthwise 3x3 conv carries position. Any H x W: reflect-padded to a multiple
of f*p and cropped back by `decode`.

Preconditioning (EDM-style, for unit-variance x0 and eps), s = (1-t)^2 + t^2:
    v_hat = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, cond, t),   c_skip = (2t-1)/s,  c_out = 1/sqrt(s)
so with the zero-initialised head, v_hat(t=1) = x_1 and the 1-NFE estimate x_1 - v_hat is 0 (= bicubic).
c_in = (1-t)/sqrt(s) rather than EDM's 1/sqrt(s): x_t carries no information about x0 at t = 1, and
fading it out there keeps the noise from polluting the 1-step prediction, which then depends on
the LR image alone (measured: +1.35 dB over bicubic after 300 steps instead of +0.17 dB)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from linearsr.model.attention import (
    linear_attention,
    linear_attention_read,
    linear_attention_state,
)
from linearsr.model.autoencoder import build_autoencoder
from linearsr.model.config import ModelConfig
from linearsr.model.flow import interpolate, velocity_target
from linearsr.model.tags import TagEmbedder, drop_tags


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [B, N, C]; shift, scale: [B, C]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t: [B] in [0, 1] -> [B, dim] sinusoidal features of 1000 t (as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LinearAttention(nn.Module):
    """Global ReLU linear attention over the image tokens. x: [B, N, C] -> [B, N, C]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.backend, self.eps = cfg.heads, cfg.attention, cfg.attention_eps
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, N, C] -> q, k, v: [B, N, H, D]."""
        num_b, num_n, num_c = x.shape
        return self.qkv(x).view(num_b, num_n, 3, self.heads, num_c // self.heads).unbind(2)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        q, k, v = self.project(x)
        o = linear_attention(q, k, v, backend=self.backend, eps=self.eps)
        return self.proj(o.flatten(2))

    # exact tiling (model/tiled.py): the state summed over all tiles, then each tile read against it
    def state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, C] (any subset of the tokens) -> their (kv, k_sum) sums, fp32."""
        _, k, v = self.project(x)
        return linear_attention_state(k, v)

    def read(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [B, N, C] -> the attention output of these tokens against the whole image's state."""
        q = self.project(x)[0]
        return self.proj(linear_attention_read(q, *state, self.eps).flatten(2))


class TagCrossAttention(nn.Module):
    """Image tokens attend (softmax) to the tag tokens. x: [B, N, C], tags: [B, T, C], mask: [B, T]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm = nn.LayerNorm(cfg.width)
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        num_b, num_n, num_c = x.shape
        d = num_c // self.heads
        q = self.q(self.norm(x)).view(num_b, num_n, self.heads, d).transpose(1, 2)
        k, v = self.kv(tags).view(num_b, -1, 2, self.heads, d).unbind(2)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :])
        return self.proj(o.transpose(1, 2).reshape(num_b, num_n, num_c))


class MixFFN(nn.Module):
    """1x1 -> depthwise 3x3 -> gated (SiLU) -> 1x1, on the token grid. x: [B, N, C] -> [B, N, C]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(round(cfg.mlp_ratio * cfg.width))
        self.inverted = nn.Linear(cfg.width, 2 * hidden)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = nn.Linear(hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        num_b, num_n, _ = x.shape
        h = F.silu(self.inverted(x)).transpose(1, 2).reshape(num_b, -1, *hw)
        h = self.depthwise(h).flatten(2).transpose(1, 2)
        h, gate = h.chunk(2, dim=-1)
        return self.point(h * F.silu(gate))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        if cfg.mixer == "gla_bidir":
            from linearsr.model.kernels.gla import BidirectionalGLA

            self.attn = BidirectionalGLA(cfg.width, cfg.heads, cfg.attention)
        else:
            self.attn = LinearAttention(cfg)
        every = cfg.cross_attn_every
        self.cross = TagCrossAttention(cfg) if every and index % every == 0 else None
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.ffn = MixFFN(cfg)
        # adaLN-single: per-block learned offsets of the shared time modulation; gates start at 0
        self.scale_shift_table = nn.Parameter(torch.zeros(6, cfg.width))

    # The parts below are what model/tiled.py runs tile by tile; forward is their composition.
    def modulation(self, t_mod: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """t_mod: [B, 6, C] -> (shift_a, scale_a, gate_a, shift_f, scale_f, gate_f), each [B, C]."""
        return (self.scale_shift_table[None] + t_mod).unbind(1)

    def mixer_input(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return modulate(self.norm1(x), mod[0], mod[1])

    def local(self, x, hw, mod, tags, tag_mask) -> torch.Tensor:
        """Everything after the global mixer: per token, except the FFN's 3x3 depthwise conv."""
        if self.cross is not None:
            x = x + self.cross(x, tags, tag_mask)
        return x + mod[5][:, None] * self.ffn(modulate(self.norm2(x), mod[3], mod[4]), hw)

    def forward(self, x, hw, t_mod, tags, tag_mask):
        """x: [B, N, C]; t_mod: [B, 6, C]; tags: [B, T, C]; tag_mask: [B, T]."""
        mod = self.modulation(t_mod)
        x = x + mod[2][:, None] * self.attn(self.mixer_input(x, mod), hw)
        return self.local(x, hw, mod, tags, tag_mask)


class LinearSR(nn.Module):
    def __init__(self, cfg: ModelConfig, ae: nn.Module | None = None):
        """`ae`: an autoencoder to share (the experts of a bundle use one); default: built from cfg."""
        super().__init__()
        self.cfg = cfg
        self._ae = (build_autoencoder(cfg) if ae is None else ae,)  # a tuple: frozen, not part of the state dict
        ch, width, p = self.ae.channels, cfg.width, cfg.patch_size
        self.patch_embed = nn.Conv2d(2 * ch, width, p, stride=p)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.tag_embed = TagEmbedder(cfg)
        if cfg.tag_pool:  # gated (zero at init) pooled tag embedding added to the time embedding
            self.tag_pool = nn.Linear(width, width)
            self.tag_gate = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.zeros(2, width))
        self.final = nn.Linear(width, p * p * ch)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        for m in self.time_mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in (self.t_block[1], self.final, *(b.cross.proj for b in self.blocks if b.cross is not None)):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def ae(self):
        return self._ae[0]

    def _apply(self, fn, recurse=True):
        self.ae._apply(fn, recurse)  # .to()/.cuda()/.float() also move the frozen autoencoder
        return super()._apply(fn, recurse)

    @property
    def multiple(self) -> int:
        """The HR grid must be a multiple of this; other sizes are reflect-padded."""
        return self.ae.factor * self.cfg.patch_size

    def _encode_image(self, img: torch.Tensor) -> torch.Tensor:
        """img: [B, 3, H, W] in [0, 1] -> [B, C, H'/f, W'/f], reflect-padded to the grid."""
        m = self.multiple
        pad_h, pad_w = (-img.shape[-2]) % m, (-img.shape[-1]) % m
        x = img * 2 - 1
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect" if min(x.shape[-2:]) > max(pad_h, pad_w) else "replicate")
        return self.ae.encode(x)

    def upsample(self, lr: torch.Tensor) -> torch.Tensor:
        """lr: [B, 3, h, w] -> bicubic [B, 3, h*s, w*s], clamped to [0, 1]."""
        s = self.cfg.scale
        return F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False).clamp(0, 1)

    @torch.no_grad()
    def encode_condition(self, lr: torch.Tensor) -> torch.Tensor:
        """lr: [B, 3, h, w] in [0, 1] -> cond [B, C, H'/f, W'/f] (also the shape of x_t and noise)."""
        return self._encode_image(self.upsample(lr))

    @torch.no_grad()
    def target(self, hr: torch.Tensor, lr: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The x0 the flow generates for this (HR, LR) pair; same shape as cond."""
        if hr.shape[-2:] != (lr.shape[-2] * self.cfg.scale, lr.shape[-1] * self.cfg.scale):
            raise ValueError(f"hr {tuple(hr.shape[-2:])} is not lr {tuple(lr.shape[-2:])} x scale {self.cfg.scale}")
        z = self._encode_image(hr)
        if not self.cfg.residual:
            return z
        cond = self.encode_condition(lr) if cond is None else cond
        return (z - cond) * self.cfg.residual_scale

    def decode(self, x0: torch.Tensor, lr: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x0 (as from `target`) -> image [B, 3, h*s, w*s] in [0, 1]."""
        if self.cfg.residual:
            cond = self.encode_condition(lr) if cond is None else cond
            x0 = x0 / self.cfg.residual_scale + cond
        img = self.ae.decode(x0)[..., : lr.shape[-2] * self.cfg.scale, : lr.shape[-1] * self.cfg.scale]
        return ((img + 1) / 2).clamp(0, 1)

    # The parts below are what model/tiled.py runs tile by tile; forward is their composition.
    def preconditioning(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t: [B] -> (c_skip, c_out, c_in), each [B, 1, 1, 1] fp32."""
        t = t.float()
        s = ((1 - t) ** 2 + t**2).view(-1, 1, 1, 1)
        c_skip, c_out = (2 * t.view(-1, 1, 1, 1) - 1) / s, s.rsqrt()
        return c_skip, c_out, (1 - t).view(-1, 1, 1, 1) * c_out

    def conditioning(self, t: torch.Tensor, tags) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """t: [B], tags: B lists -> (t_emb [B, C], t_mod [B, 6, C], tag tokens [B, T, C], tag mask [B, T])."""
        dtype = self.patch_embed.weight.dtype
        t_emb = self.time_mlp(timestep_features(t.float(), self.cfg.time_freq_dim).to(dtype))
        tag_tok, tag_mask = self.tag_embed(tags)
        if self.cfg.tag_pool:
            m = tag_mask[..., None].to(dtype)
            pooled = (tag_tok.to(dtype) * m).sum(1) / m.sum(1)
            t_emb = t_emb + self.tag_gate * self.tag_pool(pooled)
        t_mod = self.t_block(t_emb).view(t.shape[0], 6, -1)
        return t_emb, t_mod, tag_tok.to(dtype), tag_mask

    def embed(self, x_t: torch.Tensor, cond: torch.Tensor, c_in: torch.Tensor) -> torch.Tensor:
        """x_t, cond: [B, C, H', W'] -> tokens [B, C_model, H'/p, W'/p]."""
        dtype = self.patch_embed.weight.dtype  # fp32 inputs also drive a bf16 model (DeepSpeed)
        return self.patch_embed(torch.cat([c_in * x_t, cond.to(x_t.dtype)], dim=1).to(dtype))

    def head(self, x: torch.Tensor, hw: tuple[int, int], t_emb: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, C_model] on an hw grid -> the network output F [B, C, hw[0]*p, hw[1]*p]."""
        p = self.cfg.patch_size
        shift, scale = (self.final_table[None] + t_emb[:, None]).unbind(1)
        out = self.final(modulate(self.final_norm(x), shift, scale))  # [B, N, p*p*C]
        out = out.transpose(1, 2).reshape(x.shape[0], -1, *hw)
        return F.pixel_shuffle(out, p) if p > 1 else out

    def forward(self, x_t, t, cond, tags) -> torch.Tensor:
        """One network evaluation. x_t, cond: [B, C, H', W']; t: [B]; tags: B lists -> v_hat like x_t."""
        _, _, h, w = x_t.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent grid {h}x{w} is not a multiple of model.patch_size={p}; pad the image first")
        c_skip, c_out, c_in = self.preconditioning(t)
        x = self.embed(x_t, cond, c_in)
        hw = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # [B, N, C]
        t_emb, t_mod, tag_tok, tag_mask = self.conditioning(t, tags)
        for block in self.blocks:
            x = block(x, hw, t_mod, tag_tok, tag_mask)
        return (c_skip * x_t + c_out * self.head(x, hw, t_emb)).to(x_t.dtype)

    def velocity(self, x_t, t, cond, tags, guidance: float = 1.0, net=None) -> torch.Tensor:
        """v_hat with classifier-free guidance: v_u + g (v_c - v_u); one pass when g == 1 or no tags.
        t: a float or [B]. `net(model, x_t, t, cond, tags)` replaces the plain forward (e.g. tiled)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0]).contiguous()
        run = self if net is None else (lambda *args: net(self, *args))
        if guidance == 1.0 or not any(tags):
            return run(x_t, t, cond, tags)
        num_b = x_t.shape[0]
        v = run(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, cond]), list(tags) + [[]] * num_b)
        v_cond, v_uncond = v[:num_b], v[num_b:]
        return v_uncond + guidance * (v_cond - v_uncond)

    def loss(self, hr, lr, tags, t, noise=None) -> torch.Tensor:
        """Per-sample flow-matching loss [B]: mean squared error of v_hat against eps - x0.
        hr: [B, 3, h*s, w*s], lr: [B, 3, h, w] in [0, 1]; t: [B]. Tag dropout in train()."""
        cond = self.encode_condition(lr)
        x0 = self.target(hr, lr, cond)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = interpolate(x0, noise, t)
        if self.training and self.cfg.tag_dropout > 0:
            tags = drop_tags(tags, self.cfg.tag_dropout)
        v_hat = self(x_t, t.to(x0.device).float(), cond, tags)
        return (v_hat.float() - velocity_target(x0, noise)).pow(2).flatten(1).mean(1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
