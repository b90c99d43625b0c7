"""The Python API for upscaling; `linearsr upscale` is built on it.

    from linearsr import Upscaler, upscale

    up = Upscaler("runs/demo/bundle", dtype="bf16")      # load once: device, precision, compile
    hr = up(Image.open("photo.png"))                      # a PIL image in, a PIL image out (x scale)
    hr = up(lr, steps=10, tags=["cat", "grass"])          # a [3, h, w] tensor in [0, 1] in, a tensor out
    hr = upscale("runs/demo/bundle", Image.open("photo.png"), tile=128)   # one call

Images larger than `tile` LR pixels are tiled (model/tiling.py: exact where the model allows it,
else blended). Tags: given ones, else the bundle's tagger, else none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from linearsr.core.util import normalize_tags
from linearsr.model.bundle import load_bundle
from linearsr.model.imageio import to_uint8
from linearsr.model.network import LinearSR
from linearsr.model.sampler import METHODS, MoE, as_moe
from linearsr.model.tiled import ExactTiling
from linearsr.model.tiling import (
    check_tiling,
    resolve_tile_mode,
    tile_tokens,
    upscale_image,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device_dtype(device: str, dtype: str) -> torch.dtype:
    """The torch dtype for --dtype on this device; one sentence where the device cannot run it."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available; use --device cpu")
    if dtype == "fp16" and not cuda:
        raise ValueError("--dtype fp16 needs a CUDA GPU: torch runs fp16 on a CPU through slow fallback kernels; "
                         "use --dtype bf16 (or fp32) there")
    if dtype == "bf16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use --dtype fp16")
    return DTYPES[dtype]


def _forward(model: LinearSR, x_t, t, cond, tags):
    return model(x_t, t, cond, tags)


def image_to_tensor(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A PIL RGB image, an HxWx3 uint8 array or a [3, h, w] float tensor in [0, 1] -> [3, h, w] float."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be H x W x 3 uint8, got {image.shape} {image.dtype}")
        return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"an image tensor must be [3, h, w] in [0, 1], got {tuple(image.shape)}")
    return image.float()


class Upscaler:
    """A loaded bundle on a device, in a precision. `bundle`: a bundle folder, an expert
    .safetensors, or a LinearSR / MoE already in memory. dtype: fp32 | bf16 | fp16 (the network's
    weights and activations; attention states stay fp32). compile: torch.compile the network
    (first images pay the compile time). ae_path: where this machine keeps a latent bundle's
    autoencoder, when not at the path it was trained with."""

    def __init__(self, bundle: str | Path | LinearSR | MoE, device: str | None = None, dtype: str = "fp32",
                 compile: bool = False, ae_path: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = check_device_dtype(self.device, dtype)
        self.moe = load_bundle(bundle, ae_path) if isinstance(bundle, (str, Path)) else as_moe(bundle)
        for expert in self.moe.experts:  # the tagger stays fp32
            expert.to(device=self.device, dtype=self.dtype)
        if self.moe.tagger is not None:
            self.moe.tagger.to(self.device)
        self.compile = compile
        self._forward = torch.compile(_forward, dynamic=True) if compile else None
        self._exact: dict[tuple[int, int], ExactTiling] = {}

    @property
    def scale(self) -> int:
        return self.moe.scale

    def tags_for(self, lr: torch.Tensor, threshold: float = 0.5) -> list[str]:
        """The bundle tagger's tags for lr [3, h, w] (none without a tagger)."""
        if self.moe.tagger is None:
            return []
        return self.moe.tagger.predict(lr[None], max_tags=self.moe.cfg.max_tags, threshold=threshold)[0]

    def _net(self, lr: torch.Tensor, tile: int | None, tile_mode: str, batch: int):
        """The network evaluation to use: exact tiling when it applies, else the (compiled) forward."""
        expert = self.moe.experts[0]
        tiled = tile and max(lr.shape[-2:]) > tile
        if not tiled or resolve_tile_mode(expert, tile_mode) != "exact":
            return self._forward
        key = (tile_tokens(expert, tile), batch)
        if key not in self._exact:
            self._exact[key] = ExactTiling(*key, compile=self.compile)
        return self._exact[key]

    def __call__(self, image: Any, tags: list[str] | str | None = None, steps: int = 1, sampler: str = "euler",
                 guidance: float = 1.0, seed: int = 0, tile: int | None = 256, overlap: int = 16,
                 tile_mode: str = "auto", batch: int = 1, progress: bool = False) -> Any:
        """Upscale one image; returns the kind given (PIL image, uint8 array, or [3, H, W] tensor in [0, 1]).
        tile: largest LR tile side in pixels (None or 0: whole image in one pass); tile_mode: auto |
        exact | blend; overlap: blended tiles' overlap in LR pixels; batch: tiles evaluated together."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if sampler not in METHODS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(METHODS)}")
        check_tiling(tile, overlap, tile_mode, batch)
        lr = image_to_tensor(image)
        tags = normalize_tags(tags, self.moe.cfg.max_tags) if tags is not None else self.tags_for(lr)
        net = self._net(lr, tile, tile_mode, batch)
        hr = upscale_image(self.moe, lr, tags, steps, sampler, guidance, seed, tile=tile or None, overlap=overlap,
                           tile_mode=tile_mode, batch=batch, net=net, progress=progress)
        if isinstance(image, Image.Image):
            return Image.fromarray(to_uint8(hr))
        return to_uint8(hr) if isinstance(image, np.ndarray) else hr


def upscale(bundle: str | Path | LinearSR | MoE, image: Any, device: str | None = None, dtype: str = "fp32",
            compile: bool = False, ae_path: str | None = None, **kwargs: Any) -> Any:
    """One call: `Upscaler(bundle, device, dtype, compile, ae_path)(image, **kwargs)` (see Upscaler.__call__)."""
    return Upscaler(bundle, device, dtype, compile, ae_path)(image, **kwargs)
