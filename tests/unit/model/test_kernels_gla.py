"""BidirectionalGLA's torch path, and the bidirectional assembly the `fla` backend uses, on CPU.

Both fla paths (linear attention, GLA) are "causal scan forward + causal scan on the reversed
sequence - diagonal"; here the causal scan is a pure-torch one, so everything except fla's own
kernels (tests/gpu) is checked against explicit O(N^2) float64 formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linearsr.model.attention import linear_attention
from linearsr.model.kernels.fla_backend import bidirectional_linear_attention, linear_attention_fla
from linearsr.model.kernels.gla import BidirectionalGLA, bidirectional_gla, causal_gla_torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gla_inputs(b=2, n=29, h=2, d=6, e=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, n, h, e, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(b, n, h, d, generator=gen, dtype=torch.float64) + 2)  # decays near exp(-0.13)
    return q, k, v, g


def masked_decay_attention(q, k, v, g, scale, causal: bool):
    """The explicit O(N^2) formula: weight exp(C_t - C_s) for s <= t (causal), exp(-|C_t - C_s|) for all s."""
    cum = g.cumsum(1)  # [B, N, H, K]
    diff = cum[:, :, None] - cum[:, None, :]  # [B, t, s, H, K]
    if causal:
        n = q.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, :, :, None, None]
        weight = diff.masked_fill(~mask, float("-inf")).exp()
    else:
        weight = (-diff.abs()).exp()
    return scale * torch.einsum("bthk,bshk,btshk,bshe->bthe", q, k, weight, v)


@pytest.mark.parametrize("n,chunk", [(29, 8), (8, 8), (3, 32)], ids=["partial-chunks", "one-chunk", "short"])
def test_causal_torch_scan_equals_explicit_formula(n, chunk):
    q, k, v, g = gla_inputs(n=n)
    got = causal_gla_torch(q, k, v, g, scale=0.5, chunk=chunk)
    assert rel_err(got, masked_decay_attention(q, k, v, g, 0.5, causal=True)) < 1e-12


def test_causal_torch_scan_equals_the_recurrence():
    """h_t = diag(exp g_t) h_{t-1} + k_t^T v_t, o_t = scale q_t h_t (fla's naive_recurrent_gla)."""
    q, k, v, g = gla_inputs(b=1, n=20, h=1)
    h = torch.zeros(6, 5, dtype=torch.float64)
    want = []
    for t in range(20):
        h = g[0, t, 0].exp()[:, None] * h + k[0, t, 0][:, None] * v[0, t, 0][None, :]
        want.append(0.3 * q[0, t, 0] @ h)
    got = causal_gla_torch(q, k, v, g, scale=0.3, chunk=8)[0, :, 0]
    assert rel_err(got, torch.stack(want)) < 1e-12


def test_bidirectional_gla_counts_every_pair_once():
    q, k, v, g = gla_inputs()
    got = bidirectional_gla(q, k, v, g, 0.4, lambda *a: causal_gla_torch(*a, chunk=8))
    assert rel_err(got, masked_decay_attention(q, k, v, g, 0.4, causal=False)) < 1e-12


def test_strong_gates_do_not_overflow_and_keep_tokens_local():
    """With gates of -30 per token, every token sees only itself: o_t = scale (q_t . k_t) v_t."""
    q, k, v, _ = gla_inputs(n=40)
    g = torch.full_like(q, -30.0)
    got = bidirectional_gla(q.float(), k.float(), v.float(), g.float(), 1.0, causal_gla_torch)
    assert torch.isfinite(got).all()
    assert rel_err(got, (q * k).sum(-1, keepdim=True) * v) < 1e-5


def test_module_shapes_gradients_and_errors():
    torch.manual_seed(0)
    layer = BidirectionalGLA(32, 4, "torch")
    x = torch.randn(2, 6 * 7, 32, requires_grad=True)
    y = layer(x, (6, 7))
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="6x6 grid"):
        layer(x, (6, 6))
    with pytest.raises(ValueError, match="'torch' .* or 'fla'"):
        BidirectionalGLA(32, 4, "fused")
    with pytest.raises(ValueError, match="needs a GPU"):
        BidirectionalGLA(32, 4, "fla")(x, (6, 7))


def test_module_mixes_tokens_along_the_scan_both_ways():
    """A change at one token reaches tokens before and after it (bidirectional, not causal)."""
    torch.manual_seed(0)
    layer = BidirectionalGLA(16, 2, "torch").eval()
    x = torch.randn(1, 25, 16)
    x2 = x.clone()
    x2[0, 12] += 1.0
    with torch.no_grad():
        delta = (layer(x2, (5, 5)) - layer(x, (5, 5))).abs().sum(-1)[0]
    assert delta[:12].max() > 1e-4 and delta[13:].max() > 1e-4


def causal_linear_torch(q, k, v):
    """sum_{m<=n} (q_n . k_m) v_m, the op fla's chunk_linear_attn computes."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k).tril()
    return torch.einsum("bhnm,bmhe->bnhe", scores, v)


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-12), (torch.bfloat16, 1e-2)], ids=["fp64", "bf16"])
def test_fla_assembly_equals_global_attention(dtype, bound):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 33, 3, 8, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    got = bidirectional_linear_attention(q, k, v, 1e-6, causal_linear_torch)
    assert got.dtype == dtype
    pq, pk = q.double().clamp_min(0), k.double().clamp_min(0)
    want = torch.einsum("bnhd,bmhd,bmhe->bnhe", pq, pk, v.double())
    want = want / (torch.einsum("bnhd,bmhd->bnh", pq, pk)[..., None] + 1e-6)
    assert rel_err(got, want) < bound
    assert rel_err(got, linear_attention(q, k, v, backend="torch")) < max(bound, 1e-6)  # the model's reference


def test_fla_backend_without_fla_or_gpu_says_how_to_fix():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"pip install 'linearsr\[gpu\]'|needs CUDA"):
        linear_attention_fla(q, q, q)
