"""Validation: the same held-out batches, the same noise and the same stratified t grid every
time, so the curve is comparable step to step and per log-SNR interval.

    loss(interval) = mean over val samples and the interval's t grid (FlowConfig.validation_grid)
    val_loss       = mass-weighted mean over the intervals (FlowConfig.mass); a fine-tune run
                     validates only its own interval, so val_loss is that interval's loss

Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively);
a rank with fewer val batches repeats one with weight 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linearsr.core.util import stable_hash
from linearsr.model.flow import FlowConfig, Interval
from linearsr.trainer.collectives import all_max, all_sum


@dataclass
class ValBatch:
    hr: torch.Tensor  # [B, 3, H, W]
    lr: torch.Tensor  # [B, 3, h, w]
    tags: list[list[str]]
    noise: torch.Tensor  # [B, C, H', W'], fixed per sample key
    weight: float = 1.0


def fixed_noise(model, lr: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """One noise tensor per sample, seeded by the sample key (independent of rank and world size)."""
    shape = model.encode_condition(lr[:1]).shape[1:]
    out = []
    for key in keys:
        g = torch.Generator().manual_seed(stable_hash("val-noise", key) >> 1)
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


def collect(val_loader, model, max_batches: int, filler: dict, device: torch.device) -> list[ValBatch]:
    """This rank's first `max_batches` val batches (kept in memory), padded with weight-0 copies
    of `filler` (a train batch) to the largest count over the ranks (`device`: the group's)."""
    batches = []
    for b in val_loader:
        batches.append(ValBatch(b["hr"], b["lr"], b["tags"], fixed_noise(model, b["lr"], b["key"])))
        if len(batches) >= max_batches:
            break
    count = int(all_max([len(batches)], device)[0])
    while len(batches) < count:
        src = batches[0] if batches else ValBatch(filler["hr"], filler["lr"], filler["tags"],
                                                  fixed_noise(model, filler["lr"], filler["key"]))
        batches.append(ValBatch(src.hr, src.lr, src.tags, src.noise, weight=0.0))
    return batches


def intervals_for(flow: FlowConfig, finetune: Interval | None) -> list[Interval]:
    return [finetune] if finetune is not None else flow.intervals()


@torch.no_grad()
def evaluate(engine, batches: list[ValBatch], flow: FlowConfig, finetune: Interval | None,
             device: torch.device) -> tuple[float, dict[str, float]]:
    """(val_loss, {interval.key: loss}) summed over every rank's samples. NaN/inf propagate."""
    intervals = intervals_for(flow, finetune)
    sums = [0.0] * (len(intervals) + 1)  # per interval, then the sample count
    was_training = engine.module.training
    engine.eval()
    for vb in batches:
        hr, lr, noise = vb.hr.to(device), vb.lr.to(device), vb.noise.to(device)
        for i, iv in enumerate(intervals):
            for t in flow.validation_grid(iv).tolist():
                tt = torch.full((hr.shape[0],), t, device=device)
                loss = engine(hr, lr, vb.tags, tt, noise).float()
                sums[i] += vb.weight * loss.sum().item() / flow.val_points_per_interval
        sums[-1] += vb.weight * hr.shape[0]
    engine.train(was_training)
    sums = all_sum(sums, device)
    n = max(1.0, sums[-1])
    by_interval = {iv.key: sums[i] / n for i, iv in enumerate(intervals)}
    if finetune is not None:
        return by_interval[finetune.key], by_interval
    masses = [flow.mass(iv) for iv in intervals]
    total = sum(masses)
    return sum(m * by_interval[iv.key] for m, iv in zip(masses, intervals)) / total, by_interval
