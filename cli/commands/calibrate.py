"""`linearsr calibrate --config C`: the command over linearsr.trainer.calibrate (the measurement is described there)."""

from __future__ import annotations

import argparse
from datetime import date

from linearsr.trainer.calibrate import residual_std, with_residual_scale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the TOML preset to calibrate and write into (configs/*.toml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.shards=s3://... "
                                                                          "(used for the measurement, not written)")
    parser.add_argument("--samples", type=int, default=512, help="training crops to measure (default 512)")
    parser.add_argument("--dry-run", action="store_true", help="print the measured scale, write nothing")


def run(args: argparse.Namespace) -> int:
    from linearsr.trainer.config import load_config
    from linearsr.trainer.rundir import write_text_atomic

    if not args.config.endswith(".toml"):
        raise ValueError(f"--config {args.config}: calibrate writes into a TOML preset (configs/*.toml); a run's "
                         "config.json records what trained it and is not rewritten")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    cfg = load_config(args.config, args.overrides)
    if not cfg.model.residual:
        raise ValueError(f"{args.config} has model.residual = false: the flow models enc(HR) itself, residual_scale "
                         "is not used")
    std, seen = residual_std(cfg, args.samples)
    if not std > 0:
        raise ValueError(f"the residual is zero on {seen} crops of {cfg.data.shards}: HR equals bicubic(LR) there; "
                         "check data.degradation and the shards")
    scale = 1.0 / std
    print(f"residual std {std:.4g} over {seen} training crops of {cfg.data.shards} "
          f"({cfg.model.autoencoder} autoencoder, x{cfg.model.scale}, {cfg.data.degradation.mode} degradation): "
          f"model.residual_scale = {scale:.4g} (was {cfg.model.residual_scale:.4g})")
    if args.dry_run:
        return 0
    with open(args.config) as f:
        text = f.read()
    note = f"1 / std of the residual, `linearsr calibrate` on {seen} crops of {cfg.data.shards}, {date.today()}"
    write_text_atomic(args.config, with_residual_scale(text, scale, note))
    print(f"wrote model.residual_scale = {scale:.4g} into {args.config}")
    return 0
