"""TensorBoard under RUN/tb/ (rank 0): the metrics scalars, LR | 1-NFE | N-step | HR image grids,
and the resolved config as text.

Every event is written at `step_offset + step`: a fine-tune passes its init checkpoint's global
step, so an expert's curves sit on the pretrain's step axis, continuing them (TensorBoard overlays
runs that share a tag).

For a remote run URL (s3://...) the event file is written to a local staging folder and copied
to RUN/tb/ after every flush: TensorBoard's own S3 support would ignore our endpoint settings."""

from __future__ import annotations

import logging
import tempfile

import torch
import torch.nn.functional as F

from linearsr.core import storage

log = logging.getLogger(__name__)


def image_grid(lr: torch.Tensor, one_nfe: torch.Tensor, n_step: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Rows of [LR (nearest-upscaled) | 1-NFE | N-step | HR]: inputs [B, 3, H, W] in [0, 1] -> [3, B*H, 4*W]."""
    size = hr.shape[-2:]
    up = F.interpolate(lr.float(), size=size, mode="nearest")
    rows = [torch.cat([up[i], one_nfe[i].float(), n_step[i].float(), hr[i].float()], dim=-1) for i in range(hr.shape[0])]
    return torch.cat(rows, dim=-2).clamp(0, 1).cpu()


class TBWriter:
    """A SummaryWriter that also works for s3:// run dirs. Non-finite scalars are written as they are."""

    def __init__(self, run_url: str, step_offset: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.offset = step_offset
        self.remote = None
        if storage.is_local(run_url):
            logdir = storage.local_path(storage.join(run_url, "tb"))
        else:
            self.remote = storage.join(run_url, "tb")
            logdir = tempfile.mkdtemp(prefix="linearsr-tb-")
        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=logdir, flush_secs=3600)

    def scalars(self, record: dict, step: int) -> None:
        step += self.offset
        for key, value in record.items():
            if key in ("step", "checkpoint", "wall_time", "global_step"):
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)):
                        self.writer.add_scalar(f"{key}/{sub}", float(v), step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(_tag(key), float(value), step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, grid, step + self.offset)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        # markdown code block: keeps the JSON indentation readable in the TEXT tab
        self.writer.add_text(tag, "```\n" + text + "\n```", step + self.offset)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote is not None:
            storage.upload_dir(self.logdir, self.remote)

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _tag(key: str) -> str:
    """Group the plots: losses under loss/, the rest under train/ or data/."""
    if "loss" in key:
        return f"loss/{key}"
    if key.startswith("data") or key in ("storage_retries", "samples"):
        return f"data/{key}"
    return f"train/{key}"

