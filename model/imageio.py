"""Reading images for upscaling/evaluation and writing PNGs, with one-sentence errors.

`load_image` returns an RGB float tensor [3, H, W] in [0, 1] plus notes about conversions it
made (grayscale, palette, opaque alpha, 16-bit, CMYK, first frame of an animation). It
rejects what cannot be converted without inventing data: transparent pixels, 32-bit
integer or float images, empty images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from linearsr.core import storage


class ImageError(ValueError):
    """A per-file problem with an input image (the message names the file and the fix)."""


def _to_array(img: Image.Image, name: str, notes: list[str]) -> np.ndarray:
    """-> float32 [H, W, 3] in [0, 1]."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{name}: 32-bit integer pixels are not supported; save it as an 8- or 16-bit PNG")
        notes.append("16-bit grayscale: scaled to [0, 1] and converted to RGB (output is 8-bit)")
        a = np.repeat((a / 65535.0)[..., None], 3, axis=-1)
        return a.astype(np.float32)
    if mode == "F":
        raise ImageError(f"{name}: floating-point images are not supported; save it as an 8- or 16-bit PNG")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            raise ImageError(
                f"{name}: has transparent pixels (alpha channel); flatten it onto a background first"
            )
        notes.append(f"{mode} with an opaque alpha channel: alpha dropped")
    elif mode in ("L", "1"):
        notes.append("grayscale: converted to RGB")
    elif mode != "RGB":
        notes.append(f"{mode}: converted to RGB")
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """path -> (image [3, H, W] float32 in [0, 1], notes). ImageError / FileNotFoundError otherwise."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file")
    if not path.is_file():
        raise ImageError(f"{name}: is not a file")
    notes: list[str] = []
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                notes.append(f"{img.n_frames} frames: using the first")
            img.load()  # decode now: a truncated file fails here, not later
            arr = _to_array(img, name, notes)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: is not an image file Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name}: is truncated or corrupt ({e}); re-export or re-download it") from None
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ImageError(f"{name}: is {arr.shape[1]}x{arr.shape[0]} pixels; upscaling needs at least 2x2")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), notes


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    return (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def save_png(path: str | Path, img: torch.Tensor) -> Path:
    """Write [3, H, W] in [0, 1] as an 8-bit RGB PNG atomically (temp file + rename)."""
    path = Path(path)
    storage.write_local_atomic(str(path), lambda f: Image.fromarray(to_uint8(img), "RGB").save(f, format="PNG"))
    return path
