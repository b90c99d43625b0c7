"""`linearsr bench train` (`make bench-train`): steps/s of the Ray Train + DeepSpeed path with N
workers against a plain single-process torch loop on the same model, batch and data.

The plain loop is what the model costs with no distribution at all: one process with the
threads of one Ray worker, the same per-process batch, torch AdamW, the same loader. So the
steps/s ratio is the per-step cost of Ray + DeepSpeed (ZeRO partitioning, gradient all-reduce
over gloo, the engine), ideally 1.0, and the samples/s ratio the gain of N workers, ideally N.
The Ray path runs `linearsr train` for 2 x STEPS steps with a validation in the middle and
reports the second half (steady state); its start-up cost (fit() to the first step: Ray actors,
worker processes, DeepSpeed, loaders) is printed separately."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "cpu_tiny.toml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment config (default configs/cpu_tiny.toml)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement (default 40)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the plain loop (default: the CPUs of one Ray worker)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.batch_size=4")


def plain_loop(cfg, steps: int) -> tuple[float, float]:
    """(steps/s, data-wait fraction) of a single-process torch loop after 5 warm-up steps."""
    from linearsr.data.batches import finish_batch
    from linearsr.data.loader import make_train_loader
    from linearsr.model.network import LinearSR

    torch.manual_seed(cfg.run.seed)
    model = LinearSR(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    loader = make_train_loader(cfg.data, 0, 1, cfg.run.seed)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    it = iter(loader)
    wait = 0.0
    try:
        for i in range(steps + 5):
            if i == 5:
                t0, wait = time.perf_counter(), 0.0
            w0 = time.perf_counter()
            batch = finish_batch(next(it), cfg.data)  # the LR, where data.degrade_on = "device"
            wait += time.perf_counter() - w0
            t = cfg.flow.sample_t(batch["hr"].shape[0], generator=gen)
            loss = model.loss(batch["hr"], batch["lr"], batch["tags"], t).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
        elapsed = time.perf_counter() - t0
    finally:
        loader.close()
    return steps / elapsed, wait / elapsed


def ray_deepspeed(cfg, steps: int) -> tuple[float, float, float]:
    """(steps/s, data-wait fraction, start-up seconds) of `linearsr train` on a temp run dir."""
    from linearsr.cluster.launch import connect, train
    from linearsr.trainer.rundir import read_metrics

    t0 = time.time()
    connect(cfg.cluster.address)
    print(f"  (Ray ready in {time.time() - t0:.1f} s)")
    with tempfile.TemporaryDirectory(prefix="linearsr-bench-") as tmp:
        cfg = cfg.replace(run={"url": tmp, "steps": 2 * steps},
                          validation={"every": steps, "image_every": 0},
                          checkpoint={"every": 2 * steps})
        t0 = time.time()
        train(cfg)
        first, second = read_metrics(tmp)[:2]
    per_step = cfg.data.batch_size * cfg.optim.grad_accum * cfg.cluster.num_workers
    first_window = steps * per_step / first["samples_per_s"]
    return second["samples_per_s"] / per_step, second["data_wait_frac"], first["wall_time"] - first_window - t0


def run(args: argparse.Namespace) -> int:
    from linearsr.trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    b, n = cfg.data.batch_size, cfg.cluster.num_workers
    print(f"linearsr bench train: model width {cfg.model.width} x depth {cfg.model.depth}, HR crop {cfg.data.crop}, "
          f"batch {b} per process, {args.steps} timed steps, {os.cpu_count()} CPU cores")
    torch.set_num_threads(args.threads or max(1, int(cfg.cluster.cpus_per_worker)))
    plain, plain_wait = plain_loop(cfg, args.steps)
    threads = torch.get_num_threads()
    print(f"  plain torch, 1 process ({threads} thread{'s' if threads > 1 else ''}): {plain:6.2f} steps/s "
          f"{plain * b:7.1f} samples/s  (data wait {plain_wait:.0%})")
    dist, dist_wait, startup = ray_deepspeed(cfg, args.steps)
    print(f"  Ray + DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}, {n} workers:  {dist:6.2f} steps/s "
          f"{dist * b * n:7.1f} samples/s  (data wait {dist_wait:.0%})")
    print(f"  ratio Ray+DeepSpeed / plain: {dist / plain:.2f} x steps/s, {dist * n / plain:.2f} x samples/s")
    compute = (dist / (1 - dist_wait)) / (plain / (1 - plain_wait))
    print(f"  ratio without the data waits (compute + communication only): {compute:.2f} x steps/s")
    print(f"  Ray Train start-up (fit() to the first step): {startup:.1f} s")
    return 0
