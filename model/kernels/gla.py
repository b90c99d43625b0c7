"""BidirectionalGLA: gated linear attention scanned over the token sequence in both directions.

A causal GLA scan (fla's `chunk_gla`; `naive_recurrent_gla` semantics) with a per-channel log-decay
g_t <= 0 keeps the state h_t = diag(exp g_t) h_{t-1} + k_t^T v_t and outputs o_t = scale q_t h_t, so
token s reaches token t >= s with weight exp(C_t - C_s), C = cumsum(g) (the gates of s+1..t).
The reverse scan runs on the flipped sequence with the gate shifted by one (position p uses
g_{p+1}), which gives s >= t the weight exp(C_s - C_t). Together, every pair of tokens is weighted

    w(t, s) = exp(-|C_t - C_s|)      (per key channel; a data-dependent distance along the scan)

and the diagonal s = t, which both scans include, is subtracted once:

    o_t = scale * sum_s sum_d q_td k_sd w_d(t, s) v_s
        = fwd_t + rev_t - scale (q_t . k_t) v_t.

Layer (as fla's GatedLinearAttention): q, k, v projections, a low-rank gate
g = logsigmoid(W2 W1 x) / 16, the bidirectional scan, per-head RMSNorm times a SiLU output gate,
output projection. Tokens are scanned in raster order of the h x w grid.

Backends: "torch" — an exact chunked scan in fp32 (CPU or GPU, the reference); "fla" — fla's
`chunk_gla` (CUDA only). Shapes: q, k, g [B, N, H, K]; v [B, N, H, V]."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

GLA_BACKENDS = ("torch", "fla")

CausalGLA = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def causal_gla_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float, chunk: int = 16
) -> torch.Tensor:
    """Exact causal GLA, chunked: o_t = scale sum_{s<=t} sum_d q_td k_sd exp(C_td - C_sd) v_s.
    q, k, g: [B, N, H, K]; v: [B, N, H, V] -> [B, N, H, V] in v's dtype. Computed in fp32 (float64
    stays float64); every exponent is <= 0, so nothing overflows whatever the gates."""
    dtype = v.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    num_b, num_n, num_h, num_k = q.shape
    pad = -num_n % chunk
    # [B, H, chunks, C, K]; padded tokens have k = v = 0 and g = 0, so they add nothing
    q, k, v, g = (
        F.pad(x.to(work).transpose(1, 2), (0, 0, 0, pad)).unflatten(2, (-1, chunk)) for x in (q, k, v, g)
    )
    cum = g.cumsum(-2)  # C within the chunk, inclusive
    causal = torch.ones(chunk, chunk, dtype=q.dtype, device=q.device).tril()
    # within the chunk, pairs s <= t: exp(C_t - C_s) <= 1; pairs s > t are clamped to 0 and masked
    decay = (cum[..., :, None, :] - cum[..., None, :, :]).clamp_max(0).exp()  # [.., C, C, K]
    scores = (q[..., :, None, :] * k[..., None, :, :] * decay).sum(-1) * causal
    o = scores @ v
    q_in = q * cum.exp()  # decay from the chunk start to t
    k_out = k * (cum[..., -1:, :] - cum).exp()  # decay from s to the chunk end
    chunk_state = k_out.transpose(-1, -2) @ v  # [B, H, chunks, K, V]
    chunk_decay = cum[..., -1, :].exp()  # [B, H, chunks, K]
    state = torch.zeros_like(chunk_state[:, :, 0])
    inter = []
    for c in range(q.shape[2]):
        inter.append(q_in[:, :, c] @ state)
        state = chunk_decay[:, :, c, :, None] * state + chunk_state[:, :, c]
    o = (o + torch.stack(inter, 2)) * scale
    return o.flatten(2, 3)[:, :, :num_n].transpose(1, 2).to(dtype)


def fla_causal_gla() -> CausalGLA:
    """fla's `chunk_gla` (CUDA), same signature and semantics as `causal_gla_torch`."""
    from linearsr.model.kernels.fla_backend import import_fla_op

    chunk_gla = import_fla_op("gla", "chunk_gla")

    def causal(q, k, v, g, scale):
        o, _ = chunk_gla(q, k, v, g, scale=scale)
        return o

    return causal


def bidirectional_gla(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float, causal: CausalGLA
) -> torch.Tensor:
    """Both-direction GLA with pair weights exp(-|C_t - C_s|) (module docstring).
    q, k, g: [B, N, H, K]; v: [B, N, H, V] -> [B, N, H, V] in v's dtype."""
    fwd = causal(q, k, v, g, scale)
    g_next = torch.cat([g[:, 1:], torch.zeros_like(g[:, :1])], 1)  # position p decays with g_{p+1}
    rev = causal(q.flip(1), k.flip(1), v.flip(1), g_next.flip(1), scale).flip(1)
    acc = torch.promote_types(v.dtype, torch.float32)  # fp32, or float64 in tests
    diag = scale * (q.to(acc) * k.to(acc)).sum(-1, keepdim=True) * v.to(acc)
    return (fwd.to(acc) + rev.to(acc) - diag).to(v.dtype)


class BidirectionalGLA(nn.Module):
    """Token mixer x: [B, N, C] (N = h * w, raster order) -> [B, N, C]."""

    def __init__(self, width: int, heads: int, backend: str = "torch", gate_rank: int = 16, gate_norm: float = 16.0):
        super().__init__()
        if backend not in GLA_BACKENDS:
            raise ValueError(
                f"model.mixer='gla_bidir' runs on attention backend 'torch' (any device) or 'fla' (CUDA), "
                f"got {backend!r}; set model.attention accordingly"
            )
        if width % heads:
            raise ValueError(f"BidirectionalGLA: heads={heads} must divide width={width}")
        self.heads, self.head_dim, self.backend, self.gate_norm = heads, width // heads, backend, gate_norm
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.gate = nn.Sequential(nn.Linear(width, gate_rank, bias=False), nn.Linear(gate_rank, width))
        self.out_gate = nn.Linear(width, width, bias=False)
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        num_b, num_n, num_c = x.shape
        if hw[0] * hw[1] != num_n:
            raise ValueError(f"BidirectionalGLA got {num_n} tokens for a {hw[0]}x{hw[1]} grid")
        if self.backend == "fla" and not x.is_cuda:
            raise ValueError("mixer 'gla_bidir' with attention backend 'fla' needs a GPU; use model.attention=torch on CPU")
        causal = causal_gla_torch if self.backend == "torch" else fla_causal_gla()
        split = (num_b, num_n, self.heads, self.head_dim)
        q, k, v = self.q(x).view(split), self.k(x).view(split), self.v(x).view(split)
        g = (F.logsigmoid(self.gate(x).float()) / self.gate_norm).view(split)
        o = bidirectional_gla(q, k, v, g, self.head_dim**-0.5, causal)
        o = self.norm(o).reshape(num_b, num_n, num_c) * F.silu(self.out_gate(x))
        return self.proj(o)
