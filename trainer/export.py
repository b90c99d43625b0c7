"""`linearsr export CKPT OUT`: consolidate a checkpoint's ZeRO-2/3 shards (any world size) into
one fp32 state dict and write it as safetensors + JSON (config, step, interval, val loss).

    export_checkpoint("runs/demo/checkpoints/checkpoint_000300", "out/expert")  # -> out/expert.safetensors

OUT ending in `.safetensors` is written as that expert file (+ .json beside it); any other OUT is
a bundle folder: OUT/model.safetensors, OUT/model.json and OUT/manifest.json (one expert for the
whole log-SNR range). Both are what `linearsr upscale --bundle` reads. A checkpoint of a run with
optim.ema_decay > 0 exports its EMA weights unless told otherwise; the expert's JSON says which
("weights": "ema" | "raw") and carries the run's training shift ("sampling": {"shift": ...}),
which multi-step sampling follows."""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from linearsr.model.flow import FULL_RANGE
from linearsr.trainer import checkpoint as ckpt
from linearsr.trainer.zero import load_weights

log = logging.getLogger(__name__)


def export_checkpoint(ckpt_url: str, out_prefix: str | Path, ema: bool | None = None) -> Path:
    """Write OUT_PREFIX.safetensors + OUT_PREFIX.json from a complete checkpoint; returns the
    .safetensors path. ema: True = the EMA weights (the run must have optim.ema_decay > 0),
    False = the raw weights, None = the EMA weights when the checkpoint has them."""
    from linearsr.model.bundle import save_expert
    from linearsr.model.config import ModelConfig
    from linearsr.model.network import LinearSR

    ckpt.require_complete(ckpt_url)
    meta = ckpt.read_meta(ckpt_url)
    model = LinearSR(ModelConfig.from_dict(meta["config"]["model"]))
    tmp = tempfile.mkdtemp(prefix="linearsr-export-")
    try:
        state, weights = load_weights(ckpt_url, tmp, ema)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model.load_state_dict(state)
    return save_expert(out_prefix, model, {
        "step": meta["step"],
        "samples": meta.get("samples"),
        "interval": meta.get("t_interval") or FULL_RANGE.key,
        "val_loss": meta.get("val_loss"),
        "checkpoint": ckpt_url,
        "weights": weights,
        "sampling": {"shift": float((meta["config"].get("flow") or {}).get("shift", 1.0))},
    })


def export_bundle(ckpt_url: str, out_dir: str | Path, knee_step: int | None = None, ema: bool | None = None) -> Path:
    """A 1-expert bundle (the whole log-SNR range) in OUT_DIR from a complete checkpoint:
    OUT_DIR/model.safetensors + model.json + manifest.json; returns the manifest's path."""
    from linearsr.model.bundle import read_expert_meta, write_bundle

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = export_checkpoint(ckpt_url, out / "model", ema=ema)
    meta = read_expert_meta(weights)
    return write_bundle(out, [{"interval": FULL_RANGE.key, "weights": weights.name, "val_loss": meta.get("val_loss"),
                               "weights_from": meta["weights"], "checkpoint": ckpt_url, "step": meta["step"]}],
                        meta["model"], knee_step=knee_step, extra={"sampling": meta["sampling"]})


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
