"""The `fused` backend: global (non-causal) ReLU linear attention as two Triton passes.

Math, per batch b and head h (phi = ReLU, all sums over the N tokens, D = head dim):

    S = sum_m phi(k_m)^T v_m           [D, D]    fp32
    z = sum_m phi(k_m)                  [D]       fp32
    num_n = phi(q_n) S                  [D]
    den_n = phi(q_n) . z + eps          scalar
    o_n   = num_n / den_n               stored in the input dtype

Forward = pass 1 (reduce S, z over token chunks; the chunks are spread over programs so that one
image with few heads still fills the GPU, then summed) + pass 2 (o per token block).

Backward, given do_n (upstream gradient of o_n). The quotient rule gives
    dnum_n = do_n / den_n
    dden_n = -(do_n . num_n) / den_n^2  = -(do_n . o_n) / den_n
and since num_n and den_n are linear in phi(q_n), S and z:
    d phi(q_n) = dnum_n S^T + dden_n z
    dS         = sum_n phi(q_n)^T dnum_n             [D, D]
    dz         = sum_n dden_n phi(q_n)                [D]
    d phi(k_m) = v_m dS^T + dz                        (S and z are linear in phi(k_m))
    dv_m       = phi(k_m) dS
and ReLU passes the gradient where its input is positive:
    dq = d phi(q) * [q > 0],   dk = d phi(k) * [k > 0].
Backward pass 1 recomputes num, den from (q, S, z) — o is not saved — writes dq and reduces
dS, dz over chunks; pass 2 writes dk, dv. Saved for backward: q, k, v and the [D, D] state.

Precision: S, z, den, the division and dS, dz are fp32 for any input dtype; inputs may be fp32,
bf16 or fp16; outputs and gradients come back in the input dtype. Head dim D <= 128, any N.

`reference_forward` / `reference_backward` are the same two-pass math in plain torch (any dtype,
float64 in tests); they exist to check the formulas above and the kernels, not as a CPU backend."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def _kernels() -> ModuleType:
    try:
        return importlib.import_module("linearsr.model.kernels.fused_triton")
    except ImportError as e:
        raise ValueError(f"attention backend 'fused' needs triton ({e}): pip install 'linearsr[gpu]'") from e


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_head_dim: int = 128, backend: str = "fused") -> None:
    """ValueError unless q, k, v are equal-shaped [B, N, H, D] float tensors with N >= 1, D <= max."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"linear attention needs q, k, v of one shape [B, N, H, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"linear attention needs q, k, v of one dtype among fp32/bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] == 0:
        raise ValueError("linear attention got a sequence of 0 tokens")
    if q.shape[-1] > max_head_dim:
        raise ValueError(
            f"attention backend {backend!r} supports head dim <= {max_head_dim}, got {q.shape[-1]}; "
            "use more heads or model.attention=torch"
        )


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class FusedLinearAttention(torch.autograd.Function):
    """apply(q, k, v, eps, kernels, block_n, num_chunks) -> o. `kernels` is the fused_triton module
    (tests pass a copy loaded under TRITON_INTERPRET=1); block_n / num_chunks: None = heuristics."""

    @staticmethod
    def forward(ctx, q, k, v, eps: float, kernels: ModuleType, block_n: int | None, num_chunks: int | None):
        q, k, v = (_unit_last_stride(x) for x in (q, k, v))
        launch = kernels.Launch(q, block_n, num_chunks)
        o, s, z = kernels.forward(q, k, v, float(eps), launch)
        ctx.save_for_backward(q, k, v, s, z)
        ctx.eps, ctx.kernels, ctx.launch = float(eps), kernels, launch
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, s, z = ctx.saved_tensors
        dq, dk, dv = ctx.kernels.backward(q, k, v, s, z, _unit_last_stride(do), ctx.eps, ctx.launch)
        return dq, dk, dv, None, None, None, None


def linear_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """q, k, v: [B, N, H, D] on a CUDA device (fp32/bf16/fp16) -> o: [B, N, H, D] in q's dtype.
    phi = ReLU is applied inside; differentiable w.r.t. q, k, v."""
    check_inputs(q, k, v)
    if not q.is_cuda:
        raise ValueError("attention backend 'fused' needs CUDA tensors (a GPU); use model.attention=torch on CPU")
    return FusedLinearAttention.apply(q, k, v, eps, _kernels(), None, None)


def reference_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6):
    """Two-pass forward in q's dtype (no fp32 cast). [B, N, H, D] -> (o, S [B, H, D, D], z [B, H, D])."""
    pq, pk = q.clamp_min(0), k.clamp_min(0)
    s = torch.einsum("bnhd,bnhe->bhde", pk, v)
    z = pk.sum(1)
    num = torch.einsum("bnhd,bhde->bnhe", pq, s)
    den = torch.einsum("bnhd,bhd->bnh", pq, z)[..., None] + eps
    return num / den, s, z


def reference_backward(q, k, v, s, z, do, eps: float = 1e-6):
    """The backward formulas of the module docstring, in plain torch -> (dq, dk, dv)."""
    pq, pk = q.clamp_min(0), k.clamp_min(0)
    num = torch.einsum("bnhd,bhde->bnhe", pq, s)
    den = torch.einsum("bnhd,bhd->bnh", pq, z)[..., None] + eps
    dnum = do / den
    dden = -(do * num).sum(-1, keepdim=True) / den**2
    dpq = torch.einsum("bnhe,bhde->bnhd", dnum, s) + dden * z[:, None]
    ds = torch.einsum("bnhd,bnhe->bhde", pq, dnum)
    dz = (dden * pq).sum(1)
    dpk = torch.einsum("bnhe,bhde->bnhd", v, ds) + dz[:, None]
    dv = torch.einsum("bnhd,bhde->bnhe", pk, ds)
    return dpq * (q > 0), dpk * (k > 0), dv
