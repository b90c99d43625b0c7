"""The linear-attention reference against the explicit quadratic formula."""

import pytest
import torch

from linearsr.model.attention import linear_attention


def quadratic_reference(q, k, v, eps):
    """Materialise A = phi(q) phi(k)^T per head, row-normalise, multiply by v."""
    q, k = torch.relu(q), torch.relu(k)
    a = torch.einsum("bnhd,bmhd->bhnm", q, k)
    a = a / (a.sum(-1, keepdim=True) + eps)
    return torch.einsum("bhnm,bmhd->bnhd", a, v)


def test_torch_backend_matches_quadratic_formula_forward_and_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 17, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = linear_attention(q, k, v, backend="torch", eps=1e-6)
    ref = quadratic_reference(q, k, v, 1e-6)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_bf16_inputs_give_finite_output_close_to_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 2, 32) * 4 for _ in range(3))
    ref = linear_attention(q, k, v)
    out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_sdpa_is_softmax_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 4) for _ in range(3))
    a = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / 2.0, dim=-1)
    torch.testing.assert_close(linear_attention(q, k, v, backend="sdpa"), torch.einsum("bhnm,bmhd->bnhd", a, v))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("backend", ["fla", "fused"])
def test_gpu_backends_name_the_cpu_alternative(backend):
    q = torch.randn(1, 4, 1, 4)
    with pytest.raises(ValueError, match=f"'{backend}' needs a CUDA GPU; use model.attention=torch"):
        linear_attention(q, q, q, backend=backend)


def test_unknown_backend_is_named():
    q = torch.randn(1, 4, 1, 4)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        linear_attention(q, q, q, backend="flash")
