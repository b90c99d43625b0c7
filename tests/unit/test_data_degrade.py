"""Degradation: reproducible, right size, bicubic mode is a plain bicubic, realistic mode degrades."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from linearsr.data.config import DataConfig, DegradationConfig
from linearsr.data.degrade import bicubic_down, degrade, modcrop
from linearsr.trainer.configlib import from_dict


def _photo(h=96, w=128, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    coarse = (rng.random((8, 10, 3)) * 255).astype(np.uint8)
    arr = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def test_same_seed_same_lr_and_other_seed_other_lr():
    hr, cfg = _photo(), DegradationConfig()
    a, b = degrade(hr, cfg, 4, seed=7), degrade(hr, cfg, 4, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, degrade(hr, cfg, 4, seed=8))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(degrade(hr, cfg, 4, generator=g1), degrade(hr, cfg, 4, generator=g2))


@pytest.mark.parametrize("mode", ["realistic", "bicubic"])
@pytest.mark.parametrize("scale", [2, 4])
def test_lr_is_hr_size_over_scale_in_8bit_levels(mode, scale):
    hr = _photo(96, 128)
    cfg = DegradationConfig(mode=mode, second_order_prob=1.0)
    for seed in range(4):
        lr = degrade(hr, cfg, scale, seed=seed)
        assert lr.shape == (3, 96 // scale, 128 // scale) and lr.dtype == torch.float32
        assert lr.min() >= 0 and lr.max() <= 1
        assert torch.equal(lr, torch.round(lr * 255) / 255)


def test_bicubic_mode_is_pillows_bicubic():
    hr = _photo(96, 128, seed=2)
    lr = degrade(hr, DegradationConfig(mode="bicubic"), 4)
    assert torch.equal(lr, bicubic_down(hr, 4))
    arr = (hr * 255).round().byte().permute(1, 2, 0).numpy()
    ref = np.asarray(Image.fromarray(arr).resize((32, 24), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    diff = np.abs(lr.permute(1, 2, 0).numpy() - ref)
    assert diff.max() <= 2.5 / 255 and diff.mean() < 0.5 / 255
    batch = bicubic_down(hr[None].repeat(2, 1, 1, 1), 4)
    assert batch.shape == (2, 3, 24, 32) and torch.equal(batch[1], lr)


def test_realistic_lr_is_visibly_degraded_and_varied():
    hr = _photo(128, 128, seed=3)
    clean = bicubic_down(hr, 4)
    psnrs = [_psnr(degrade(hr, DegradationConfig(), 4, seed=s), clean) for s in range(8)]
    assert max(psnrs) < 45  # noise/blur/JPEG changed every LR
    assert max(psnrs) - min(psnrs) > 1.0  # and by different amounts


def test_bad_sizes_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by scale 4.*modcrop"):
        degrade(_photo(90, 128), DegradationConfig(), 4, seed=0)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        bicubic_down(torch.zeros(1, 32, 32), 4)
    assert modcrop(_photo(90, 130), 4).shape == (3, 88, 128)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data\.crop must be a positive multiple of data\.scale=4"):
        DataConfig(crop=30)
    with pytest.raises(ValueError, match=r"data\.degradation\.jpeg_quality"):
        DegradationConfig(jpeg_quality=(0, 200))
    with pytest.raises(ValueError, match=r"data\.degradation\.resize_probs"):
        DegradationConfig(resize_probs=(0.5, 0.6, 0.1))
    with pytest.raises(ValueError, match=r"data\.max_skip_fraction"):
        DataConfig(max_skip_fraction=1.5)
    with pytest.raises(ValueError, match=r"data\.s3_endpoint"):
        DataConfig(s3_endpoint="127.0.0.1:9000")
    with pytest.raises(ValueError, match="degradation.mode"):
        from_dict(DataConfig, {"degradation": {"mode": "gaussian"}}, prefix="data")
    cfg = from_dict(DataConfig, {"shards": "s3://b/p", "crop": 64, "degradation": {"jpeg_quality": [40, 90]}}, prefix="data")
    assert cfg.degradation.jpeg_quality == (40, 90) and cfg.crop == 64
