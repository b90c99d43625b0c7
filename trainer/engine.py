"""DeepSpeed engine from the config: ZeRO-2/3, fp32 (CPU) or bf16, gradient accumulation and
clipping, warmup + cosine/constant schedule, a torch AdamW, optional EMA weights.

CPU facts this module encodes (measured on this project's CPU machines): DeepSpeed reuses the process group that
Ray Train already created; its shared-memory comm op would spend ~40 s in g++ on first use, so
it is marked incompatible before `init_distributed`; its own Adam compiles for a minute, so a
torch AdamW is passed in."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
import torch.nn as nn

from linearsr.trainer.config import TrainConfig

log = logging.getLogger(__name__)


class FlowLoss(nn.Module):
    """The module DeepSpeed wraps: forward = the model's per-sample flow-matching loss, so every
    training and validation pass goes through the engine (ZeRO-3 gathers parameters in hooks).
    State-dict keys carry the prefix `model.`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, hr, lr, tags, t, noise=None) -> torch.Tensor:
        """hr: [B, 3, H, W], lr: [B, 3, h, w], t: [B] -> loss [B]."""
        return self.model.loss(hr, lr, tags, t, noise)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of optim.lr after `step` optimizer steps: linear warmup from 1/warmup, then
    cosine from 1 down to min_ratio at `total_steps` (or constant)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage, "overlap_comm": False}
    if cfg.deepspeed.zero_stage == 3:
        # small models: partition every parameter (the default threshold keeps small ones whole)
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def init_distributed(use_gpu: bool) -> None:
    """Let DeepSpeed adopt the torch process group that Ray Train set up (gloo on CPU)."""
    import deepspeed
    import deepspeed.ops

    if "__compatible_ops__" in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoid ~40 s of g++ on CPU
    else:  # no DeepSpeed op is used (torch AdamW, gloo/nccl): skip its compiler probes too
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def build_engine(cfg: TrainConfig, model: nn.Module):
    """Wrap `model` (LinearSR) into a DeepSpeed engine. Returns (engine, scheduler)."""
    import deepspeed

    opt_cfg = cfg.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("table") else decay).append(p)
    groups = [{"params": decay, "weight_decay": opt_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas))
    min_ratio = opt_cfg.min_lr / opt_cfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, cfg.run.steps, opt_cfg.warmup_steps, opt_cfg.schedule, min_ratio),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=FlowLoss(model), optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
    )
    return engine, scheduler


class EMA:
    """Exponential moving average of the (replicated, ZeRO-2) weights, kept in fp32.
    Keys are the LinearSR state-dict names (no `model.` prefix). With the optimizer step given,
    the decay warms up as min(decay, (1 + step) / (10 + step)), so the average forgets the
    initial weights within a few hundred steps instead of ~1 / (1 - decay)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """While active the model holds the EMA weights (validation, samples); the raw ones after."""
        raw = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(raw[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.contiguous() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:3]}; the checkpoint is from another model")
        self.shadow = {n: state[n].float().clone() for n in self.shadow}


def current_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def grad_norm(engine) -> float:
    """Global grad norm of the last optimizer step (before clipping); NaN when unknown."""
    g = engine.get_global_grad_norm()
    if g is None:
        return math.nan
    return float(g.item() if isinstance(g, torch.Tensor) else g)
