"""`linearsr export CKPT OUT`: the command over linearsr.trainer.export (what it writes is described there)."""

from __future__ import annotations

import argparse
from pathlib import Path

from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer.export import export_bundle, export_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint URL: RUN/checkpoints/checkpoint_XXXXXX (local or s3://)")
    parser.add_argument("out", metavar="OUT", help="a bundle folder, or an expert file ending in .safetensors")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--ema", dest="ema", action="store_true", default=None,
                         help="export the EMA weights (default when the checkpoint has them)")
    weights.add_argument("--raw", dest="ema", action="store_false", help="export the raw weights, not the EMA ones")
    parser.set_defaults(ema=None)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    ckpt.require_complete(args.checkpoint)  # before anything is created
    if out.suffix == ".safetensors":
        weights = export_checkpoint(args.checkpoint, out.with_suffix(""), ema=args.ema)
        print(f"linearsr export: wrote {weights} (+ {weights.with_suffix('.json').name})")
        return 0
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; give a bundle folder, or a path ending in .safetensors for one expert file")
    from linearsr.model.bundle import read_expert_meta

    manifest = export_bundle(args.checkpoint, out, ema=args.ema)
    step = read_expert_meta(out / "model.safetensors")["step"]
    print(f"linearsr export: wrote the 1-expert bundle {manifest} (step {step})")
    return 0
