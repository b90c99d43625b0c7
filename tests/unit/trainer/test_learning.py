"""A learning test, not just shapes: a tiny LinearSR trained with a plain torch loop on crops of
one real photo lowers its loss clearly, and its 1-NFE output beats bicubic on a held-out crop."""

import math

import pytest
import torch
import torch.nn.functional as F

from linearsr.model.config import ModelConfig
from linearsr.model.flow import FlowConfig
from linearsr.model.network import LinearSR
from linearsr.model.sampler import sample


def down(hr: torch.Tensor) -> torch.Tensor:
    """Antialiased bicubic x1/4, quantised to 8 bits (the usual SR benchmark degradation)."""
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (lr * 255).round() / 255


def psnr_y(a: torch.Tensor, b: torch.Tensor, border: int = 4) -> float:
    """PSNR on the Y channel (ITU-R BT.601, [16, 235]) with the border cropped, as in SR papers."""
    w = torch.tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    d = ((a - b) * w).sum(1)[..., border:-border, border:-border]
    return 10 * math.log10(255**2 / d.pow(2).mean().item())


def test_tiny_model_learns_to_beat_bicubic(one_thread):
    skd = pytest.importorskip("skimage.data")
    photo = torch.from_numpy(skd.astronaut().copy()).permute(2, 0, 1).float()[None] / 255  # 512 x 512
    train, held_out = photo[..., :, :384], photo[..., 128:384, 384:]  # held-out: the right quarter
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = LinearSR(ModelConfig.preset("cpu_tiny", width=32, depth=2, heads=1, tag_dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    flow = FlowConfig(shift=3.0)  # more weight on the noisy end, which the 1-step sampler uses

    def crops(n: int) -> torch.Tensor:
        ys = torch.randint(0, train.shape[-2] - 64, (n,), generator=gen)
        xs = torch.randint(0, train.shape[-1] - 64, (n,), generator=gen)
        return torch.cat([train[..., y : y + 64, x : x + 64] for y, x in zip(ys.tolist(), xs.tolist())])

    val_hr = crops(16)
    val_t, val_noise = flow.validation_grid(flow.intervals()[0]).repeat(4), torch.randn(16, 48, 16, 16, generator=gen)

    def val_loss() -> float:
        with torch.no_grad():
            return model.eval().loss(val_hr, down(val_hr), [[]] * 16, val_t, val_noise).mean().item()

    before = val_loss()
    model.train()
    for step in range(300):
        hr = crops(8)
        loss = model.loss(hr, down(hr), [[]] * 8, flow.sample_t(8, generator=gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < 0.8 * before, f"validation loss {before:.3f} -> {after:.3f}"

    lr = down(held_out)
    sr = sample(model, lr, steps=1).image
    bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    gain = psnr_y(sr, held_out) - psnr_y(bicubic, held_out)
    assert gain > 0.5, f"1-NFE PSNR-Y gain over bicubic {gain:.2f} dB"
