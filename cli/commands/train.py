"""`linearsr train`: pretrain or fine-tune on a local or attached Ray cluster.

    linearsr train --config configs/cpu_tiny.toml optim.lr=1e-3 --run runs/demo
    linearsr train --config RUN/config.json --run RUN/experts/0_-inf_-3 --init CKPT --t-interval=-inf,-3

Rerunning on an existing run dir resumes it from its newest complete checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("linearsr.train")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that say what to train (shared with `linearsr submit`)."""
    parser.add_argument("--config", required=True, help="TOML preset (configs/*.toml) or a run's resolved config.json")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=2e-4 run.steps=100")
    parser.add_argument("--run", help="run dir URL (local folder or s3://bucket/prefix); default run.url or runs/<run.name>")
    parser.add_argument("--init", help="fine-tune: take the weights (only) from this checkpoint URL; step, optimizer "
                                       "and schedule start fresh")
    parser.add_argument("--t-interval", help="fine-tune: draw t only inside this log-SNR interval LO,HI; write it "
                                             "with '=' when it starts with '-' (--t-interval=-inf,-3)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--address", help="Ray address (host:port) to attach to; default cluster.address, then RAY_ADDRESS")


def resolve(args: argparse.Namespace, address: str | None = None):
    """The TrainConfig from the config file, overrides and flags (and a Ray address to attach to).
    The sidecar's [esgf] table is checked here too, so a typo in it stops the launch."""
    from linearsr.ckpt_analysis.config import check_config
    from linearsr.trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.run:
        cfg = cfg.replace(run={"url": args.run})
    finetune = {}
    if args.init:
        finetune["init"] = args.init
    if args.t_interval:
        finetune["t_interval"] = args.t_interval
    if finetune:
        cfg = cfg.replace(finetune=finetune)
    if address:
        cfg = cfg.replace(cluster={"address": address})
    check_config(cfg.to_dict())
    return cfg


def run(args: argparse.Namespace) -> int:
    from linearsr.cluster.launch import train

    cfg = resolve(args, args.address)
    try:
        result = train(cfg)
    except RuntimeError as e:  # the training itself failed (after Ray's restarts): one line, no traceback
        print(f"linearsr train: error: {e}", file=sys.stderr)
        return 1
    val = "n/a" if result.val_loss is None else f"{result.val_loss:.4f}"
    print(f"linearsr train: {result.run_url} at step {result.step}, val_loss {val}, last checkpoint "
          f"{result.checkpoint or 'none'} ({result.seconds:.0f} s)")
    return 0
