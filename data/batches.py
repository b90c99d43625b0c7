"""From decoded samples to training batches: aligned HR/LR crops, flips, collation, and the LR.

A sample with a real low-resolution capture (KEY.lr.png) keeps it: its LR crop is the HR crop's
aligned 1/scale window. Every other sample gets a synthetic LR from `degradations.synthesize`,
seeded per sample, either in the loader worker (data.degrade_on = "loader") or on the device
that trains on it (data.degrade_on = "device": the worker ships HR + seeds, `finish_batch` runs
right after the batch is moved to the device). Both give the same LR for the same seed.

    finished batch: {"hr": [B,3,c,c], "lr": [B,3,c/s,c/s] float32 in [0, 1], "tags", "key",
                     "degradation": {"blur", "noise", "jpeg", ...: [B]} (NaN for real pairs)}
    unfinished batch (device mode): {"hr", "lr" (zeros where synthetic), "real_lr": [B] bool,
                     "seed": [B] int64, "tags", "key"}
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch

from linearsr.data.config import DataConfig
from linearsr.data.degradations import degrade_batch, usm_sharpen


class Item(NamedTuple):
    hr: np.ndarray  # [c, c, 3] uint8
    lr: np.ndarray | None  # [c/s, c/s, 3] uint8, or None: synthesise
    tags: list[str]
    key: str
    seed: int  # the degradation seed of this crop


def _pad_to(arr: np.ndarray, size: int, step: int) -> np.ndarray:
    """Mirror-pad arr [H, W, 3] to at least size x size, by multiples of step on each side."""
    h, w = arr.shape[:2]
    ph, pw = (-(-max(0, size - h) // step) * step), (-(-max(0, size - w) // step) * step)
    if not (ph or pw):
        return arr
    top, left = (ph // step // 2) * step, (pw // step // 2) * step
    return np.pad(arr, ((top, ph - top), (left, pw - left), (0, 0)), mode="symmetric")


def crop_pair(hr: np.ndarray, lr: np.ndarray | None, size: int, scale: int,
              rng: random.Random | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A size x size crop of hr [H, W, 3] (random if rng is given, else centred) and, for a real
    pair, the aligned size/scale crop of lr. Copies, so they do not pin the whole image; images
    smaller than the crop are mirror-padded first (a pair by whole LR pixels)."""
    step = scale if lr is not None else 1
    hr = _pad_to(hr, size, step)
    if lr is not None:
        lr = _pad_to(lr, size // scale, 1)
    h, w = hr.shape[:2]
    ny, nx = (h - size) // step + 1, (w - size) // step + 1
    y = (rng.randrange(ny) if rng else (ny - 1) // 2) * step
    x = (rng.randrange(nx) if rng else (nx - 1) // 2) * step
    hr_crop = hr[y:y + size, x:x + size].copy()
    if lr is None:
        return hr_crop, None
    s = size // scale
    return hr_crop, lr[y // scale:y // scale + s, x // scale:x // scale + s].copy()


def augment(hr: np.ndarray, lr: np.ndarray | None, rng: random.Random) -> tuple[np.ndarray, np.ndarray | None]:
    """The same random flip + 90-degree rotation of both crops."""
    flip, k = rng.random() < 0.5, rng.randrange(4)

    def f(a):
        return None if a is None else np.rot90(a[:, ::-1] if flip else a, k=k)
    return f(hr), f(lr)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def collate(items: list[Item], scale: int) -> dict:
    """An unfinished batch of crops (all the same size)."""
    hr = torch.stack([to_tensor(it.hr) for it in items])
    lr = torch.zeros(hr.shape[0], 3, hr.shape[2] // scale, hr.shape[3] // scale)
    for i, it in enumerate(items):
        if it.lr is not None:
            lr[i] = to_tensor(it.lr)
    return {"hr": hr, "lr": lr, "real_lr": torch.tensor([it.lr is not None for it in items]),
            "seed": torch.tensor([it.seed for it in items], dtype=torch.int64),
            "tags": [it.tags for it in items], "key": [it.key for it in items]}


def finish_batch(batch: dict, cfg: DataConfig, device: torch.device | str | None = None) -> dict:
    """Move a batch to `device` (default: where it is), unsharp-mask its HR if data.degradation.usm_hr,
    and give every sample without a real LR its synthetic one there (from the sharpened HR, as
    `degradations.synthesize`). A finished batch (degrade_on = "loader") is only moved."""
    hr, lr = batch["hr"].to(device), batch["lr"].to(device)
    if "seed" not in batch:
        return {**batch, "hr": hr, "lr": lr}
    if cfg.degradation.usm_hr:
        hr = usm_sharpen(hr)
    synth = (~batch["real_lr"]).nonzero().flatten()
    n = hr.shape[0]
    params = {k: torch.full((n,), float("nan")) for k in ("blur", "noise", "jpeg")}
    if len(synth):
        idx = synth.to(hr.device)
        lr_s, p = degrade_batch(hr[idx], cfg.degradation, cfg.scale, batch["seed"][synth])
        lr = lr.index_copy(0, idx, lr_s)
        for k, v in p.items():
            col = params.setdefault(k, torch.full((n,), float("nan")) if v.is_floating_point()
                                    else torch.zeros(n, dtype=v.dtype))
            col[synth] = v
    return {"hr": hr, "lr": lr, "tags": batch["tags"], "key": batch["key"], "degradation": params}
