"""Sampling the flow ODE dx/dt = v from t = 1 (noise) to t = 0, and the SNR mixture of experts.

`MoE(experts, intervals)` routes every network evaluation to the expert whose log-SNR
interval owns lambda(t) and records the route; a single model is the K = 1 case.
Euler with N steps costs N evaluations (1 step = 1-NFE); Heun costs 2N - 1 (its last step,
which lands on t = 0, is an Euler step)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from linearsr.model.flow import (
    FULL_RANGE,
    Interval,
    check_partition,
    find_interval,
    lambda_of_t,
    sampling_times,
)
from linearsr.model.network import LinearSR

log = logging.getLogger(__name__)

METHODS = ("euler", "heun")


class MoE(nn.Module):
    """K experts, one per contiguous log-SNR interval (sorted, covering -inf..inf).
    `route` lists (t, lambda, expert_index) for every evaluation since the last `reset_route()`."""

    def __init__(self, experts: list[LinearSR], intervals: list[Interval] | None = None):
        super().__init__()
        intervals = [FULL_RANGE] if intervals is None and len(experts) == 1 else intervals
        if intervals is None or len(intervals) != len(experts):
            raise ValueError(f"MoE needs one log-SNR interval per expert: {len(experts)} experts, intervals {intervals}")
        check_partition(intervals)
        configs = {e.cfg.scale for e in experts}, {(e.cfg.autoencoder, e.cfg.ae_factor, e.cfg.ae_path, e.cfg.residual,
                                                    e.cfg.residual_scale, e.cfg.patch_size) for e in experts}
        if any(len(c) > 1 for c in configs):
            raise ValueError("MoE experts must share scale, autoencoder, residual and patch settings")
        self.experts = nn.ModuleList(experts)
        self.intervals = list(intervals)
        self.route: list[tuple[float, float, int]] = []
        self.tagger = None  # set by load_bundle when the bundle carries a tagger
        self.shift = 1.0  # the training flow.shift, which multi-step sampling grids follow (set by load_bundle)

    @property
    def cfg(self):
        return self.experts[0].cfg

    @property
    def scale(self) -> int:
        return self.cfg.scale

    def reset_route(self) -> None:
        self.route = []

    def expert_for(self, t: float) -> int:
        return find_interval(self.intervals, float(lambda_of_t(float(t))))

    def velocity(self, x_t, t: float, cond, tags, guidance: float = 1.0, net=None) -> torch.Tensor:
        """All samples share the scalar t, so one expert runs the whole batch (`net`: see LinearSR.velocity)."""
        i = self.expert_for(t)
        self.route.append((float(t), float(lambda_of_t(float(t))), i))
        return self.experts[i].velocity(x_t, t, cond, tags, guidance, net)

    # the data path (encode/decode) is shared by all experts
    def encode_condition(self, lr):
        return self.experts[0].encode_condition(lr)

    def decode(self, x0, lr, cond=None):
        return self.experts[0].decode(x0, lr, cond)


@dataclass
class SampleResult:
    image: torch.Tensor  # [B, 3, H, W] in [0, 1]
    route: list[tuple[float, float, int]] = field(default_factory=list)  # per evaluation (t, lambda, expert)

    @property
    def nfe(self) -> int:
        return len(self.route)


def as_moe(model_or_moe: LinearSR | MoE) -> MoE:
    if isinstance(model_or_moe, MoE):
        return model_or_moe
    if isinstance(model_or_moe, LinearSR):
        return MoE([model_or_moe])
    if isinstance(getattr(model_or_moe, "module", None), LinearSR):  # DDP / DeepSpeed engine
        return MoE([model_or_moe.module])
    raise TypeError(f"sample() needs a LinearSR or a MoE, got {type(model_or_moe).__name__}")


@torch.no_grad()
def sample(
    model_or_moe: LinearSR | MoE,
    lr: torch.Tensor,
    tags: list[list[str]] | None = None,
    steps: int = 1,
    method: str = "euler",
    guidance: float = 1.0,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    net=None,
    shift: float | None = None,
) -> SampleResult:
    """Super-resolve lr [B, 3, h, w] in [0, 1] -> SampleResult(image [B, 3, h*s, w*s], route).
    `noise` (shaped like `encode_condition(lr)`) replaces the seeded draw, e.g. for tiling;
    `net(model, x_t, t, cond, tags)` replaces each network evaluation (model/tiled.py).
    `shift`: the time shift of the step grid (default: the bundle's training shift, 1 for a bare model)."""
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(METHODS)}")
    moe = as_moe(model_or_moe)
    tags = [[] for _ in range(lr.shape[0])] if tags is None else tags
    if len(tags) != lr.shape[0]:
        raise ValueError(f"got {len(tags)} tag lists for {lr.shape[0]} images")
    modes = {m: m.training for m in moe.modules()}
    moe.eval()
    moe.reset_route()
    cond = moe.encode_condition(lr)
    if noise is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(cond.shape, generator=gen, dtype=torch.float32)
    elif noise.shape != cond.shape:
        raise ValueError(f"noise of shape {tuple(noise.shape)} does not match the latent grid {tuple(cond.shape)}")
    x = noise.to(device=cond.device, dtype=cond.dtype)
    grid = sampling_times(steps, moe.shift if shift is None else shift)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t_cur
        v = moe.velocity(x, t_cur, cond, tags, guidance, net)
        if method == "heun" and t_next > 0:
            x_euler = x + dt * v
            v_next = moe.velocity(x_euler, t_next, cond, tags, guidance, net)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x + dt * v
    image = moe.decode(x, lr, cond)
    for m, mode in modes.items():
        m.training = mode
    return SampleResult(image=image, route=list(moe.route))
