"""`linearsr experts RUN --from-checkpoint CKPT`: fine-tune the per-log-SNR experts from a
checkpoint the operator chose (knee detection skipped) and write RUN/bundle/.

    linearsr experts runs/tiny --from-checkpoint runs/tiny/checkpoints/checkpoint_000004
    linearsr experts runs/tiny                   resume the experts of the decision already taken
    linearsr experts runs/tiny --retry-failed    give failed experts another round of attempts

Restart-safe like the sidecar: jobs already submitted (analysis/state.json + Ray) are followed,
never submitted again.
"""

from __future__ import annotations

import argparse

from linearsr.ckpt_analysis.decision import manual_decision
from linearsr.ckpt_analysis.experts import checkpoint_complete
from linearsr.ckpt_analysis.sidecar import Sidecar, absolute
from linearsr.core.storage import exists


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="the pretrain run dir (local folder or s3://bucket/prefix/NAME)")
    parser.add_argument("--from-checkpoint", dest="checkpoint", default=None,
                        help="checkpoint URL the experts start from (default: the decision already taken)")
    parser.add_argument("--knee-step", type=int, default=None, help="knee step to record in the bundle (optional)")
    parser.add_argument("--retry-failed", action="store_true", help="give experts that failed for good another round")
    parser.add_argument("--ray-address", default=None, help="Ray Jobs API URL (default: esgf.ray_address, RAY_ADDRESS, `make ray-up`)")
    parser.add_argument("--poll", type=float, default=None, help="seconds between polls (default: esgf.poll_seconds)")


def run(args: argparse.Namespace) -> int:
    sidecar = Sidecar(args.run, ray_address=args.ray_address, poll_seconds=args.poll)
    decision = sidecar.decision()
    if args.checkpoint:
        ckpt = absolute(args.checkpoint)
        if decision is not None and decision["checkpoint"].rstrip("/") != ckpt:
            raise ValueError(
                f"{sidecar.run.decision} already chose {decision['checkpoint']}; remove it and "
                f"{sidecar.run.state} to start the experts over from {ckpt}")
        if not exists(ckpt):
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
        if not checkpoint_complete(ckpt):
            raise ValueError(f"checkpoint {ckpt} is incomplete (its save was interrupted); choose another")
        if decision is None:
            _ = sidecar.jobs  # fail on an unreachable cluster before writing anything
            decision = manual_decision(sidecar.run.read_metrics(), ckpt, sidecar.cfg, args.knee_step)
            sidecar.save_decision(decision)
    elif decision is None:
        raise ValueError(f"{sidecar.run.url} has no decision yet: pass --from-checkpoint CKPT, "
                         "or let the sidecar decide (`linearsr analyze RUN --watch`)")
    return sidecar.run_experts(decision, retry_failed=args.retry_failed)
