"""Fast attention backends against references, on a GPU: forward and every gradient, bf16 and fp32.

Errors are relative Frobenius norms against a float64 reference computed from the same (rounded)
inputs. Bounds: fused fp32 1e-4 (fp32 accumulation, "ieee" dots), fused bf16 1e-2 (bf16 outputs,
tf32 state products; 3.3e-3 under the CPU interpreter); fla fp32 5e-3 and bf16 3e-2 (fla rounds
each causal scan to the input dtype and uses tf32 inside; 1.5e-3 measured on an H200 in bf16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linearsr.model.attention import linear_attention
from linearsr.model.kernels.fused import linear_attention_fused, reference_forward
from linearsr.model.kernels.gla import BidirectionalGLA, bidirectional_gla, causal_gla_torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

EPS = 1e-6
# (B, N, H, D): the bench shape, non-multiples of every block size, the base model's heads, D = 128
SHAPES = [(1, 1024, 16, 64), (2, 1000, 3, 40), (1, 4097, 4, 128), (3, 77, 36, 32), (1, 65536, 16, 64)]
BOUNDS = {"fused": {torch.float32: 1e-4, torch.bfloat16: 1e-2}, "fla": {torch.float32: 5e-3, torch.bfloat16: 3e-2}}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(shape, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, generator=gen, device="cuda").to(dtype).requires_grad_() for _ in range(3)]


def check_against_float64(fn, shape, dtype, bound):
    q, k, v = inputs(shape, dtype)
    o = fn(q, k, v)
    assert o.dtype == dtype and o.shape == q.shape
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_forward(q64, k64, v64, EPS)[0]
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    errs = {"o": rel_err(o, ref)} | {f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads)}
    assert all(g.dtype == dtype for g in grads)
    assert max(errs.values()) < bound, errs
    # and the project's own torch reference agrees within the same bound
    assert rel_err(o, linear_attention(q, k, v, backend="torch", eps=EPS)) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_float64(shape, dtype):
    check_against_float64(lambda q, k, v: linear_attention(q, k, v, backend="fused", eps=EPS), shape, dtype,
                          BOUNDS["fused"][dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_fla_matches_float64(shape, dtype):
    pytest.importorskip("fla.ops", reason="flash-linear-attention is not installed (make gpu-check installs it)")
    check_against_float64(lambda q, k, v: linear_attention(q, k, v, backend="fla", eps=EPS), shape, dtype,
                          BOUNDS["fla"][dtype])


def test_fused_takes_views_of_a_packed_projection():
    packed = torch.randn(2, 999, 3, 8, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = packed.unbind(2)
    o = linear_attention_fused(q, k, v, EPS)
    o.float().square().sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference_forward(q64, k64, v64, EPS)[0]
    ref.square().sum().backward()
    assert rel_err(o, ref) < 1e-2
    assert rel_err(packed.grad, torch.stack([q64.grad, k64.grad, v64.grad], 2)) < 2e-2


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 1000, 4, 32), (1, 4096, 36, 32)], ids=["2x1000x4x32", "1x4096x36x32"])
def test_fla_gla_matches_torch_scan(shape, dtype, bound):
    pytest.importorskip("fla.ops", reason="flash-linear-attention is not installed (make gpu-check installs it)")
    from linearsr.model.kernels.gla import fla_causal_gla

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(torch.randn(shape, generator=gen, device="cuda")) / 16).requires_grad_()
    scale = shape[-1] ** -0.5
    o = bidirectional_gla(q, k, v, g, scale, fla_causal_gla())
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v, g), do)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, g)]
    ref = bidirectional_gla(*ref_in, scale, causal_gla_torch)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double())
    errs = {"o": rel_err(o, ref)} | {f"d{n}": rel_err(a, b) for n, a, b in zip("qkvg", grads, ref_grads)}
    assert max(errs.values()) < bound, errs


def train_run(attention: str, mixer: str = "linear", steps: int = 15, device: str = "cuda"):
    """bf16-autocast AdamW steps of a small LinearSR on one fixed batch -> (losses, the first step's
    gradient of block 0's mixer, flattened). The adaLN gates and the output layer start at 0, which
    would hide the mixer from the loss at step 0; they get random values (same seed for every
    backend) so that it counts."""
    from linearsr.model.config import ModelConfig
    from linearsr.model.network import LinearSR

    torch.manual_seed(0)
    cfg = ModelConfig.preset("cpu_tiny", attention=attention, mixer=mixer, width=128, heads=4, tag_dropout=0.0)
    model = LinearSR(cfg).to(device).train()
    with torch.no_grad():
        for block in model.blocks:
            block.scale_shift_table.normal_(std=0.3)
        model.final.weight.normal_(std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(0)
    hr = torch.rand(4, 3, 128, 128, generator=gen, device=device)
    lr = F.interpolate(hr, scale_factor=0.25, mode="area")
    t = torch.rand(4, generator=gen, device=device)
    noise = torch.randn(model.encode_condition(lr).shape, generator=gen, device=device)
    losses, grad0 = [], None
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model.loss(hr, lr, [["cat"]] * 4, t, noise).mean()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        if grad0 is None:
            grad0 = torch.cat([p.grad.flatten().float() for p in model.blocks[0].attn.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grad0


@pytest.mark.parametrize("attention,mixer", [("torch", "linear"), ("fused", "linear"), ("fla", "linear"),
                                             ("torch", "gla_bidir"), ("fla", "gla_bidir")])
def test_bf16_training_steps_are_finite_learn_and_agree_with_torch(attention, mixer):
    if attention == "fla":
        pytest.importorskip("fla.ops", reason="flash-linear-attention is not installed (make gpu-check installs it)")
    losses, grad0 = train_run(attention, mixer)
    assert all(map(torch.isfinite, torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert grad0.norm() > 0, "the mixer must receive a gradient"
    if attention != "torch":  # same init and batch as the torch twin: same first loss and mixer gradient
        ref_losses, ref_grad0 = train_run("torch", mixer, steps=1)
        assert abs(losses[0] - ref_losses[0]) < 1e-2 * ref_losses[0], (losses[0], ref_losses[0])
        assert rel_err(grad0, ref_grad0) < 5e-2


def test_gla_module_on_gpu_matches_its_torch_twin():
    pytest.importorskip("fla.ops", reason="flash-linear-attention is not installed (make gpu-check installs it)")
    torch.manual_seed(0)
    ref = BidirectionalGLA(256, 8, "torch").cuda()
    fast = BidirectionalGLA(256, 8, "fla").cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32 * 40, 256, device="cuda")
    assert rel_err(fast(x, (32, 40)), ref(x, (32, 40))) < 5e-3
