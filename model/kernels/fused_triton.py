"""Triton kernels behind the `fused` backend (the math and its derivation are in `fused.py`).

Every kernel runs on the grid (num_chunks, B*H): program (c, bh) owns the tokens of chunk c of
batch-head bh and loops over them in BLOCK_N-token blocks. Splitting N into chunks keeps the GPU
full when B*H is small (one image, 16 heads); the per-chunk partial sums of the D x D state are
then reduced by one deterministic `sum` (no atomics, so results do not depend on scheduling).

    forward   _state_kernel  S_c = sum_{n in c} phi(k_n)^T v_n, z_c = sum phi(k_n)   -> S, z
              _out_kernel    o_n = phi(q_n) S / (phi(q_n) . z + eps)
    backward  _dq_kernel     dq_n, and partials of dS = sum phi(q)^T dnum, dz = sum dden phi(q)
              _dkv_kernel    dk_n = [k_n > 0] (v_n dS^T + dz),  dv_n = phi(k_n) dS

Loaded tiles are cast to fp32 before any arithmetic, and the matrix products take fp32 operands
with `input_precision` "tf32" for 16-bit inputs (bf16/fp16 values are exact in tf32, so phi(k)^T v
is exact up to fp32 accumulation) and "ieee" for fp32 inputs. The fp32 casts also keep the kernels
correct under Triton's CPU interpreter (TRITON_INTERPRET=1), whose `tl.dot` mishandles bf16.
S and z are stored padded to [BLOCK_D, BLOCK_D] / [BLOCK_D] with zeros, so loads of them need no
mask; q/k/v/o tiles are masked on N and D (any N, any D <= 128)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 128


@triton.jit
def _block(c, i, blocks_per_chunk, N, D, offs_d, BLOCK_N: tl.constexpr):
    """int64 token indices of block i of chunk c, and the [BLOCK_N, BLOCK_D] in-bounds mask."""
    rows = ((c * blocks_per_chunk + i) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return rows, (rows < N)[:, None] & (offs_d < D)[None, :]


@triton.jit
def _tile(ptr, rows, stride_n, offs_d, mask):
    """fp32 tile [BLOCK_N, BLOCK_D] of a [.., N, .., D] tensor (rows: int64 token indices)."""
    return tl.load(ptr + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_state(s_ptr, z_ptr, index, offs_d, BLOCK_D: tl.constexpr):
    """The padded [BLOCK_D, BLOCK_D] matrix and [BLOCK_D] vector number `index` (int64)."""
    s = tl.load(s_ptr + index * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :])
    return s, tl.load(z_ptr + index * BLOCK_D + offs_d)


@triton.jit
def _store_state(s_ptr, z_ptr, index, s, z, offs_d, BLOCK_D: tl.constexpr):
    tl.store(s_ptr + index * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :], s)
    tl.store(z_ptr + index * BLOCK_D + offs_d, z)


@triton.jit
def _state_kernel(
    k_ptr, v_ptr, s_ptr, z_ptr,
    N, H, D, skb, skn, skh, svb, svn, svh, blocks_per_chunk,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    k_ptr += b * skb + h * skh
    v_ptr += b * svb + h * svh
    offs_d = tl.arange(0, BLOCK_D)
    s = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    z = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(blocks_per_chunk):
        rows, mask = _block(c, i, blocks_per_chunk, N, D, offs_d, BLOCK_N)
        k = tl.maximum(_tile(k_ptr, rows, skn, offs_d, mask), 0.0)
        v = _tile(v_ptr, rows, svn, offs_d, mask)
        s = tl.dot(tl.trans(k), v, s, input_precision=PRECISION)
        z += tl.sum(k, axis=0)
    _store_state(s_ptr, z_ptr, bh.to(tl.int64) * tl.num_programs(0) + c, s, z, offs_d, BLOCK_D)


@triton.jit
def _out_kernel(
    q_ptr, s_ptr, z_ptr, o_ptr,
    N, H, D, sqb, sqn, sqh, sob, son, soh, eps, blocks_per_chunk,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    q_ptr += b * sqb + h * sqh
    o_ptr += b * sob + h * soh
    offs_d = tl.arange(0, BLOCK_D)
    s, z = _load_state(s_ptr, z_ptr, bh.to(tl.int64), offs_d, BLOCK_D)
    for i in range(blocks_per_chunk):
        rows, mask = _block(c, i, blocks_per_chunk, N, D, offs_d, BLOCK_N)
        q = tl.maximum(_tile(q_ptr, rows, sqn, offs_d, mask), 0.0)
        num = tl.dot(q, s, input_precision=PRECISION)
        den = tl.sum(q * z[None, :], axis=1) + eps
        o = num / den[:, None]
        tl.store(o_ptr + rows[:, None] * son + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_kernel(
    q_ptr, do_ptr, s_ptr, z_ptr, dq_ptr, ds_ptr, dz_ptr,
    N, H, D, sqb, sqn, sqh, sdob, sdon, sdoh, sdqb, sdqn, sdqh, eps, blocks_per_chunk,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    q_ptr += b * sqb + h * sqh
    do_ptr += b * sdob + h * sdoh
    dq_ptr += b * sdqb + h * sdqh
    offs_d = tl.arange(0, BLOCK_D)
    s, z = _load_state(s_ptr, z_ptr, bh.to(tl.int64), offs_d, BLOCK_D)
    ds = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    dz = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(blocks_per_chunk):
        rows, mask = _block(c, i, blocks_per_chunk, N, D, offs_d, BLOCK_N)
        q_raw = _tile(q_ptr, rows, sqn, offs_d, mask)
        q = tl.maximum(q_raw, 0.0)
        do = _tile(do_ptr, rows, sdon, offs_d, mask)
        num = tl.dot(q, s, input_precision=PRECISION)
        den = tl.sum(q * z[None, :], axis=1) + eps
        dnum = do / den[:, None]
        dden = -tl.sum(do * num, axis=1) / (den * den)
        dq = tl.dot(dnum, tl.trans(s), input_precision=PRECISION) + dden[:, None] * z[None, :]
        dq = tl.where(q_raw > 0.0, dq, 0.0)
        tl.store(dq_ptr + rows[:, None] * sdqn + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask)
        ds = tl.dot(tl.trans(q), dnum, ds, input_precision=PRECISION)
        dz += tl.sum(dden[:, None] * q, axis=0)
    _store_state(ds_ptr, dz_ptr, bh.to(tl.int64) * tl.num_programs(0) + c, ds, dz, offs_d, BLOCK_D)


@triton.jit
def _dkv_kernel(
    k_ptr, v_ptr, ds_ptr, dz_ptr, dk_ptr, dv_ptr,
    N, H, D, skb, skn, skh, svb, svn, svh, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, blocks_per_chunk,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    c, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    k_ptr += b * skb + h * skh
    v_ptr += b * svb + h * svh
    dk_ptr += b * sdkb + h * sdkh
    dv_ptr += b * sdvb + h * sdvh
    offs_d = tl.arange(0, BLOCK_D)
    ds, dz = _load_state(ds_ptr, dz_ptr, bh.to(tl.int64), offs_d, BLOCK_D)
    for i in range(blocks_per_chunk):
        rows, mask = _block(c, i, blocks_per_chunk, N, D, offs_d, BLOCK_N)
        k_raw = _tile(k_ptr, rows, skn, offs_d, mask)
        k = tl.maximum(k_raw, 0.0)
        v = _tile(v_ptr, rows, svn, offs_d, mask)
        dk = tl.dot(v, tl.trans(ds), input_precision=PRECISION) + dz[None, :]
        dk = tl.where(k_raw > 0.0, dk, 0.0)
        dv = tl.dot(k, ds, input_precision=PRECISION)
        tl.store(dk_ptr + rows[:, None] * sdkn + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptr + rows[:, None] * sdvn + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)


_SM_COUNT: dict[int, int] = {}


def _programs_target(device: torch.device) -> int:
    """How many programs fill the device: 4 per SM on a GPU; 4 on the CPU interpreter."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


class Launch:
    """Block sizes and the N split for one [B, N, H, D] problem. block_n / num_chunks override the
    heuristics (tests use them to force several chunks and partial blocks at tiny N)."""

    def __init__(self, q: torch.Tensor, block_n: int | None = None, num_chunks: int | None = None):
        num_b, num_n, num_h, num_d = q.shape
        self.block_d = max(16, triton.next_power_of_2(num_d))
        self.block_n = block_n or (64 if self.block_d <= 64 else 32)
        self.num_warps = 4 if self.block_d <= 64 else 8
        num_blocks = triton.cdiv(num_n, self.block_n)
        want = num_chunks or triton.cdiv(_programs_target(q.device), num_b * num_h)
        self.blocks_per_chunk = triton.cdiv(num_blocks, max(1, min(num_blocks, want)))
        self.num_chunks = triton.cdiv(num_blocks, self.blocks_per_chunk)  # no empty chunk
        self.bh = num_b * num_h
        self.grid = (self.num_chunks, self.bh)
        self.precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def consts(self) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_D=self.block_d, PRECISION=self.precision, num_warps=self.num_warps)

    def partials(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded per-chunk [D, D] and [D] fp32 buffers, [B*H*chunks, BD, BD] / [.., BD]."""
        n = self.bh * self.num_chunks
        return (
            q.new_empty(n, self.block_d, self.block_d, dtype=torch.float32),
            q.new_empty(n, self.block_d, dtype=torch.float32),
        )

    def reduce(self, part: torch.Tensor) -> torch.Tensor:
        """[B*H*chunks, ...] -> [B*H, ...], summed over chunks."""
        part = part.view(self.bh, self.num_chunks, *part.shape[1:])
        return part[:, 0] if self.num_chunks == 1 else part.sum(1)


def _s(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def forward(q, k, v, eps: float, launch: Launch):
    """q, k, v: [B, N, H, D] with unit last stride -> (o [B, N, H, D] in q.dtype,
    S [B*H, BD, BD] fp32, z [B*H, BD] fp32)."""
    num_b, num_n, num_h, num_d = q.shape
    s_part, z_part = launch.partials(q)
    _state_kernel[launch.grid](
        k, v, s_part, z_part, num_n, num_h, num_d, *_s(k), *_s(v), launch.blocks_per_chunk, **launch.consts()
    )
    s, z = launch.reduce(s_part), launch.reduce(z_part)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    _out_kernel[launch.grid](
        q, s, z, o, num_n, num_h, num_d, *_s(q), *_s(o), eps, launch.blocks_per_chunk, **launch.consts()
    )
    return o, s, z


def backward(q, k, v, s, z, do, eps: float, launch: Launch):
    """Gradients of `forward` w.r.t. q, k, v given do: [B, N, H, D] (unit last stride)."""
    num_b, num_n, num_h, num_d = q.shape
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    ds_part, dz_part = launch.partials(q)
    _dq_kernel[launch.grid](
        q, do, s, z, dq, ds_part, dz_part, num_n, num_h, num_d,
        *_s(q), *_s(do), *_s(dq), eps, launch.blocks_per_chunk, **launch.consts(),
    )
    ds, dz = launch.reduce(ds_part), launch.reduce(dz_part)
    _dkv_kernel[launch.grid](
        k, v, ds, dz, dk, dv, num_n, num_h, num_d,
        *_s(k), *_s(v), *_s(dk), *_s(dv), launch.blocks_per_chunk, **launch.consts(),
    )
    return dq, dk, dv
