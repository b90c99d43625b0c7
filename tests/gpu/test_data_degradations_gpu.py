"""The degradation on CUDA gives the LR it gives on the CPU for the same seeds (float rounding aside:
log/cos ulps can move an 8-bit or a JPEG rounding step, so a few pixels may differ by a level or so)."""

import torch

from linearsr.data.config import DegradationConfig
from linearsr.data.degradations import degrade_batch, normal_noise


def test_cuda_and_cpu_agree_for_the_same_seeds():
    g = torch.Generator().manual_seed(0)
    hr = torch.nn.functional.interpolate(torch.rand(8, 3, 16, 16, generator=g), size=(128, 128), mode="bicubic").clamp(0, 1)
    seeds = list(range(100, 108))
    cpu, p_cpu = degrade_batch(hr, DegradationConfig(), 4, seeds)
    gpu, p_gpu = degrade_batch(hr.cuda(), DegradationConfig(), 4, seeds)
    diff = (gpu.cpu() - cpu).abs() * 255
    assert gpu.device.type == "cuda"
    assert float(diff.mean()) < 0.25 and float((diff > 1.5).float().mean()) < 0.01, (float(diff.mean()), float(diff.max()))
    for k in ("blur", "jpeg"):
        assert torch.equal(p_cpu[k], p_gpu[k])
    assert torch.allclose(p_cpu["noise"], p_gpu["noise"], rtol=1e-4)
    z_cpu, z_gpu = normal_noise(3, 1, (100_000,)), normal_noise(3, 1, (100_000,), "cuda")
    assert torch.allclose(z_cpu, z_gpu.cpu(), atol=1e-5)
