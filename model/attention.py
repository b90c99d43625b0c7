"""Global (non-causal) ReLU linear attention behind one interface, plus the softmax baseline.

    o_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps),   phi = ReLU

`torch` is the reference (CPU and GPU); `sdpa` is softmax attention (for comparisons only);
`fla` and `fused` are CUDA kernels in `linearsr.model.kernels`, imported only when used.
The k-v state, the normaliser and the division are fp32 even for bf16 inputs: in half
precision the sum over N tokens overflows or loses the normaliser (a known source of NaNs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "sdpa", "fla", "fused")


def linear_attention_state(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v: [B, N, H, D] -> (kv [B, H, D, D], k_sum [B, H, D]): the sums over tokens, in fp32 (fp64 stays
    fp64). Sums over disjoint token sets add up to the sum over their union (exact tiling uses this)."""
    acc = torch.promote_types(k.dtype, torch.float32)  # fp32 state for half inputs
    k, v = F.relu(k).to(acc), v.to(acc)
    return torch.einsum("bnhd,bnhe->bhde", k, v), k.sum(dim=1)


def linear_attention_read(q: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """q: [B, N, H, D] and a state from `linear_attention_state` -> o: [B, N, H, D] in q's dtype."""
    dtype = q.dtype
    q = F.relu(q).to(kv.dtype)
    num = torch.einsum("bnhd,bhde->bnhe", q, kv)
    den = torch.einsum("bnhd,bhd->bnh", q, k_sum).unsqueeze(-1) + eps
    return (num / den).to(dtype)


def linear_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """q, k, v: [B, N, H, D] -> o: [B, N, H, D] in q's dtype; O(N D^2)."""
    return linear_attention_read(q, *linear_attention_state(k, v), eps)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: [B, N, H, D] -> [B, N, H, D]; O(N^2 D) softmax baseline."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "torch", eps: float = 1e-6
) -> torch.Tensor:
    """q, k, v: [B, N, H, D] (phi = ReLU is applied inside) -> [B, N, H, D]."""
    if backend == "torch":
        return linear_attention_torch(q, k, v, eps)
    if backend == "sdpa":
        return softmax_attention(q, k, v)
    if backend in ("fla", "fused"):
        if not torch.cuda.is_available():
            raise ValueError(f"attention backend {backend!r} needs a CUDA GPU; use model.attention=torch on CPU")
        if backend == "fla":
            from linearsr.model.kernels.fla_backend import linear_attention_fla

            return linear_attention_fla(q, k, v, eps)
        from linearsr.model.kernels.fused import linear_attention_fused

        return linear_attention_fused(q, k, v, eps)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
