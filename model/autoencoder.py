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


# diffusers AutoencoderDC arguments of mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (the SANA DC-AE,
# 312M parameters, x32 down, 32 latent channels), as in diffusers' convert_dcae_to_diffusers.py: the
# benchmark builds it with random weights to time the latent preset where the weights are absent.
DC_AE_F32C32 = dict(
    latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024), decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407,
)
# The same block types at toy size (x2 down, 8 channels, 22k parameters): tests and `bench infer --quick`.
TINY_DC_AE = dict(
    latent_channels=8, attention_head_dim=8, encoder_block_types=("ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 16),
    decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
    encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), downsample_block_type="Conv",
    upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.5,
)


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
    """A frozen diffusers `AutoencoderKL` / `AutoencoderDC` (`load` reads one from a local folder
    as written by `save_pretrained`). Latents are scaled by the model's `scaling_factor` (and
    `shift_factor` when it has one); encoding takes the posterior mode, so it is deterministic."""

    CLASSES = ("AutoencoderKL", "AutoencoderDC")

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.is_kl = type(vae).__name__ == "AutoencoderKL"
        blocks = cfg.block_out_channels if self.is_kl else cfg.encoder_block_out_channels
        self.factor = 2 ** (len(blocks) - 1)
        self.channels = cfg.latent_channels
        self.scaling = float(cfg.scaling_factor)
        self.shift = float(getattr(cfg, "shift_factor", None) or 0.0)

    @classmethod
    def load(cls, path: str | Path) -> "LatentAutoencoder":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"latent autoencoder folder {str(path)!r} has no config.json; point model.ae_path at a local diffusers "
                "AutoencoderKL/AutoencoderDC folder (README: the DC-AE download), or use model.autoencoder=pixel"
            )
        try:
            import diffusers
        except ImportError:
            raise ValueError("model.autoencoder=latent needs diffusers: pip install 'linearsr[latent]'") from None
        class_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
        if class_name not in cls.CLASSES:
            raise ValueError(f"{str(config_file)!r} describes a {class_name}; LinearSR reads AutoencoderKL or AutoencoderDC")
        ae = cls(getattr(diffusers, class_name).from_pretrained(str(path)))
        log.info("latent autoencoder %s from %s: %d channels, factor %d", class_name, path, ae.channels, ae.factor)
        return ae

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
    return LatentAutoencoder.load(cfg.ae_path)
