"""The space the flow lives in. One interface: `encode(x: [B, 3, H, W] in [-1, 1]) -> [B, C, H/f, W/f]`,
`decode(z) -> [B, 3, H, W]`, `channels` (C) and `factor` (f).

- `PixelAutoencoder`: lossless space-to-depth (pixel-unshuffle by f); no weights, works offline.
- `LatentAutoencoder`: a diffusers `AutoencoderKL` / `AutoencoderDC` loaded from a local folder
  (frozen; diffusers is imported only here, only when used)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from linearsr.model.config import ModelConfig

log = logging.getLogger(__name__)


class PixelAutoencoder(nn.Module):
    """Pixel-unshuffle by `factor`: [B, 3, H, W] -> [B, 3 f^2, H/f, W/f], exactly invertible."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        self.channels = 3 * factor * factor

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.factor) if self.factor > 1 else x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.factor) if self.factor > 1 else z


class LatentAutoencoder(nn.Module):
    """A frozen diffusers autoencoder from a local folder (as written by `save_pretrained`).
    Latents are scaled by the model's `scaling_factor` (and `shift_factor` when it has one);
    encoding takes the posterior mode, so it is deterministic."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"latent autoencoder folder {str(path)!r} has no config.json; point model.ae_path at a local diffusers "
                "AutoencoderKL/AutoencoderDC folder, or use model.autoencoder=pixel"
            )
        try:
            import diffusers
        except ImportError:
            raise ValueError("model.autoencoder=latent needs diffusers: pip install 'linearsr[latent]'") from None
        class_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
        if class_name not in ("AutoencoderKL", "AutoencoderDC"):
            raise ValueError(f"{str(config_file)!r} describes a {class_name}; LinearSR reads AutoencoderKL or AutoencoderDC")
        self.vae = getattr(diffusers, class_name).from_pretrained(str(path)).eval().requires_grad_(False)
        cfg = self.vae.config
        self.is_kl = class_name == "AutoencoderKL"
        blocks = cfg.block_out_channels if self.is_kl else cfg.encoder_block_out_channels
        self.factor = 2 ** (len(blocks) - 1)
        self.channels = cfg.latent_channels
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)
        log.info("latent autoencoder %s from %s: %d channels, factor %d", class_name, path, self.channels, self.factor)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(next(self.vae.parameters()).dtype)
        out = self.vae.encode(x)
        z = out.latent_dist.mode() if self.is_kl else out.latent
        return ((z - self.shift) * self.scaling).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = (z / self.scaling + self.shift).to(next(self.vae.parameters()).dtype)
        return self.vae.decode(z).sample.float()


def build_autoencoder(cfg: ModelConfig) -> PixelAutoencoder | LatentAutoencoder:
    if cfg.autoencoder == "pixel":
        return PixelAutoencoder(cfg.ae_factor)
    return LatentAutoencoder(cfg.ae_path)
