"""Small LinearSR models for inference tests: weights that all matter, bundles on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from linearsr.model.bundle import save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearSR


def trained_like(cfg: ModelConfig, seed: int = 0) -> LinearSR:
    """A model whose every weight is non-zero (a fresh one zero-initialises its gates and head), so
    its output depends on the global context the way a trained one does."""
    torch.manual_seed(seed)
    model = LinearSR(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


def write_moe_bundle(folder: Path, cfg: ModelConfig, intervals: list[str], seed: int = 0) -> Path:
    """A bundle of len(intervals) different trained-like experts ("lo,hi" log-SNR intervals)."""
    entries = []
    for i, interval in enumerate(intervals):
        save_expert(folder / f"expert_{i}", trained_like(cfg, seed + i), {"step": 0, "interval": interval})
        entries.append({"interval": interval, "weights": f"expert_{i}.safetensors"})
    write_bundle(folder, entries, cfg)
    return folder
