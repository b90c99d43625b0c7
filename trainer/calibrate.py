"""`linearsr calibrate --config C [KEY=VALUE ...]`: measure the flow target's scale on the shards
and write `model.residual_scale` into the config file C.

With model.residual the flow generates x0 = (enc(HR) - enc(bicubic(LR))) * residual_scale, and the
network's preconditioning assumes x0 of unit variance. The std of that residual depends on the
autoencoder (pixel-unshuffle of images in [-1, 1]: ~0.1 on photos, hence the pixel presets' 10; a
DC-AE latent: something else), the scale and the degradation, so it is measured on training
batches exactly as the trainer draws them: residual_scale = 1 / std.

    linearsr calibrate --config configs/base_x4_latent.toml data.shards=s3://BUCKET/shards

Only the residual_scale line of C's [model] table changes (comments and everything else stay);
`--dry-run` prints the value and writes nothing."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tomllib

import torch

log = logging.getLogger(__name__)


@torch.no_grad()
def residual_std(cfg, samples: int) -> tuple[float, int]:
    """(std of enc(HR) - enc(bicubic(LR)) over `samples` training crops, crops measured)."""
    from linearsr.data.loader import make_train_loader
    from linearsr.model.network import LinearSR

    # the data path only (encode, target): the smallest network around the configured autoencoder
    data_path = dataclasses.replace(cfg.model, residual_scale=1.0, width=8, depth=1, heads=1, mixer="linear",
                                    attention="torch", tag_encoder="hash", tag_vocab_size=1)
    model = LinearSR(data_path).eval()
    loader = make_train_loader(cfg.data, 0, 1, cfg.run.seed)
    total = total_sq = count = 0.0
    seen = 0
    try:
        while seen < samples:
            batch = next(loader)
            x0 = model.target(batch["hr"], batch["lr"]).double()
            total, total_sq, count = total + x0.sum().item(), total_sq + (x0**2).sum().item(), count + x0.numel()
            seen += batch["hr"].shape[0]
    finally:
        loader.close()
    mean = total / count
    return math.sqrt(max(total_sq / count - mean**2, 0.0)), seen


_SECTION = re.compile(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$")
_KEY = re.compile(r"^(\s*)residual_scale\s*=")


def with_residual_scale(text: str, value: float, note: str) -> str:
    """The TOML text with [model] residual_scale set to `value` (the line replaced, or added
    first in the table, or a [model] table appended); checked by parsing it back."""
    line = f"residual_scale = {value:.4g}   # {note}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if (m := _SECTION.match(ln)) and m.group(1).strip() == "model"), None)
    if start is None:
        lines += ["\n" if lines and not lines[-1].endswith("\n") else "", "\n[model]\n", line]
    else:
        end = next((i for i in range(start + 1, len(lines)) if _SECTION.match(lines[i])), len(lines))
        at = next((i for i in range(start + 1, end) if _KEY.match(lines[i])), None)
        if at is None:
            lines.insert(start + 1, line)
        else:
            lines[at] = _KEY.match(lines[at]).group(1) + line
    new = "".join(lines)
    try:
        written = tomllib.loads(new).get("model", {}).get("residual_scale")
    except tomllib.TOMLDecodeError:
        written = None
    if written is None or not math.isclose(written, float(f"{value:.4g}")):
        raise ValueError("could not write model.residual_scale into the config (is [model] an inline table?); "
                         f"set residual_scale = {value:.4g} by hand")
    return new
