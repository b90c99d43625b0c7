"""The `fused` backend's math and its Triton kernels, on CPU.

The kernels run under Triton's interpreter (numpy on the CPU) at tiny shapes, forward and all three
gradients, against a float64 reference. Bounds (relative Frobenius error): fp32 inputs 1e-5 (the
kernels accumulate in fp32), bf16 inputs 1e-2 (outputs and gradients are rounded to bf16, unit
roundoff 3.9e-3). TRITON_INTERPRET=1 must be set before triton is first imported, so the kernels
run in one subprocess (this file run as a script) and the tests check what it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from linearsr.model.attention import linear_attention
from linearsr.model.kernels.fused import (
    FusedLinearAttention,
    check_inputs,
    linear_attention_fused,
    reference_backward,
    reference_forward,
)

EPS = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]


def direct_grads(q, k, v, do):
    """float64 output and gradients of the one-line formula, by autograd."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    pq, pk = q.clamp_min(0), k.clamp_min(0)
    num = torch.einsum("bnhd,bmhd,bmhe->bnhe", pq, pk, v)
    den = torch.einsum("bnhd,bmhd->bnh", pq, pk)[..., None] + EPS
    o = num / den
    o.backward(do.double())
    return o.detach(), q.grad, k.grad, v.grad


def test_documented_backward_equals_autograd():
    q, k, v = qkv((2, 23, 3, 7))
    do = torch.randn(2, 23, 3, 7, dtype=torch.float64)
    o, s, z = reference_forward(q, k, v, EPS)
    ref_o, *ref_grads = direct_grads(q, k, v, do)
    assert rel_err(o, ref_o) < 1e-12
    for got, want in zip(reference_backward(q.detach(), k.detach(), v.detach(), s, z, do, EPS), ref_grads):
        assert rel_err(got, want) < 1e-12


def test_reference_matches_the_model_attention():
    q, k, v = qkv((1, 50, 2, 16), torch.float32)
    assert rel_err(reference_forward(q, k, v, EPS)[0], linear_attention(q, k, v, backend="torch", eps=EPS)) < 1e-5


def test_bad_inputs_get_one_sentence_errors():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="one shape"):
        check_inputs(q, q, q[:, :4])
    with pytest.raises(ValueError, match="'fused' supports head dim <= 128"):
        check_inputs(*[torch.randn(1, 8, 1, 130)] * 3)
    with pytest.raises(ValueError, match="one dtype"):
        check_inputs(q, q, q.double())
    with pytest.raises(ValueError, match="needs CUDA"):
        linear_attention_fused(q, q, q)


# (B, N, H, D, block_n, num_chunks): partial last blocks (N % block_n != 0), D below its power-of-2
# block, several chunks per (b, h), N smaller than one block, the largest head dim, heuristics.
SHAPES = [
    (2, 37, 3, 20, 16, 2),
    (1, 5, 1, 16, 16, 1),
    (1, 70, 2, 128, 16, 3),
    (2, 64, 2, 32, None, None),
]
BOUNDS = {"fp32": 1e-5, "bf16": 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def interpreter_errors() -> dict:
    """Run in the subprocess: {"<shape>-<dtype>": {"o": err, "dq": .., "dk": .., "dv": .., "dtypes_ok": bool}}."""
    import triton  # noqa: F401  (first import, with TRITON_INTERPRET=1 set by the parent)

    from linearsr.model.kernels import fused_triton

    out = {}
    for (b, n, h, d, block_n, num_chunks) in SHAPES:
        for name, dtype in DTYPES.items():
            q, k, v = qkv((b, n, h, d), dtype, seed=n)
            o = FusedLinearAttention.apply(q, k, v, EPS, fused_triton, block_n, num_chunks)
            do = torch.randn(b, n, h, d, generator=torch.Generator().manual_seed(1)).to(dtype)
            o.backward(do)
            ref = direct_grads(q, k, v, do)
            got = (o, q.grad, k.grad, v.grad)
            errs = {key: rel_err(x, r) for key, x, r in zip(("o", "dq", "dk", "dv"), got, ref)}
            errs["dtypes_ok"] = all(x.dtype == dtype and x.shape == (b, n, h, d) for x in got)
            out[f"{b}x{n}x{h}x{d}-{name}"] = errs
    # q, k, v as strided views into one packed projection, as the network produces them
    packed = torch.randn(2, 19, 3, 2, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
    q, k, v = packed.unbind(2)
    o = FusedLinearAttention.apply(q, k, v, EPS, fused_triton, 16, 2)
    o.backward(torch.ones_like(o))
    ref_o, *ref_grads = direct_grads(q, k, v, torch.ones_like(o))
    out["strided"] = {"o": rel_err(o, ref_o), "dqkv": rel_err(packed.grad, torch.stack(ref_grads, 2))}
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict:
    triton = pytest.importorskip("triton", reason="triton is not installed: pip install triton (the dev extra has it)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        if "0-dimensional arrays" in proc.stderr:  # known: range() over a runtime int in triton 3.6's interpreter
            pytest.skip(f"triton {triton.__version__}'s interpreter fails with numpy >= 2.4 (fixed in triton 3.7)")
        pytest.fail(f"interpreter run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_interpreted_kernels_match_float64(interpreted, shape, dtype):
    errs = interpreted["x".join(map(str, shape[:4])) + f"-{dtype}"]
    assert errs.pop("dtypes_ok"), "outputs and gradients must come back in the input dtype and shape"
    assert max(errs.values()) < BOUNDS[dtype], errs


def test_interpreted_kernels_accept_strided_views(interpreted):
    assert max(interpreted["strided"].values()) < BOUNDS["fp32"], interpreted["strided"]


if __name__ == "__main__":
    print(json.dumps(interpreter_errors()))
