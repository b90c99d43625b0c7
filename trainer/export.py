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
