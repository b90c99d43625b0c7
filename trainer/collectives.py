"""The trainer's collectives, on the device of the process group's backend.

NCCL rejects CPU tensors, gloo CUDA ones: every tensor collective here puts its tensor on the
`device` it is given (the engine's device), so the same code runs on a gloo (CPU) and an NCCL
(GPU) group. Object collectives go through torch's, which stage pickles on the current device.
Outside a process group (tests, single-process tools) each is the identity."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _reduce(values: list[float], device: torch.device, op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    return _reduce(values, device, dist.ReduceOp.SUM)


def all_min(values: list[float], device: torch.device) -> list[float]:
    return _reduce(values, device, dist.ReduceOp.MIN)


def all_max(values: list[float], device: torch.device) -> list[float]:
    return _reduce(values, device, dist.ReduceOp.MAX)


def gather(obj) -> list:
    """obj of every rank, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_tensors(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Overwrite every rank's tensors (in place, same names and shapes everywhere) with rank 0's."""
    if not dist.is_initialized():
        return
    for name in sorted(tensors):
        t = tensors[name]
        staged = t.detach().to(device)
        dist.broadcast(staged, src=0)
        t.copy_(staged)
