"""The batched Real-ESRGAN degradation: reproducible per sample, right sizes, bicubic mode is a plain
bicubic, the kernels are what their formulas say, the parameters follow Real-ESRGAN's published
defaults, the second-order noise lands at LR scale, and the tags follow the thresholds."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from linearsr.data.config import KERNEL_TYPES, DataConfig, DegradationConfig, TagThresholds
from linearsr.data.degradations import Kernel, degradation_tags, degrade, degrade_batch, draw, normal_noise, synthesize, usm_sharpen
from linearsr.data.degrade import bicubic_down, modcrop
from linearsr.trainer.configlib import from_dict


def _photo(h=96, w=128, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    coarse = (rng.random((8, 10, 3)) * 255).astype(np.uint8)
    arr = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def test_a_sample_lr_depends_on_its_seed_only_not_on_its_batch():
    hr = torch.stack([_photo(seed=s) for s in range(4)])
    cfg = DegradationConfig()
    lr, params = degrade_batch(hr, cfg, 4, [11, 12, 13, 14])
    again, _ = degrade_batch(hr[[2, 0]], cfg, 4, [13, 11])
    assert torch.equal(again[0], lr[2]) and torch.equal(again[1], lr[0])
    assert torch.equal(degrade(hr[1], cfg, 4, 12), lr[1])
    assert not torch.equal(degrade(hr[1], cfg, 4, 99), lr[1])
    assert set(params) >= {"blur", "noise", "jpeg"} and all(v.shape == (4,) for v in params.values())


@pytest.mark.parametrize("mode", ["realistic", "bicubic"])
@pytest.mark.parametrize("scale,size", [(2, (96, 128)), (4, (96, 128)), (4, (32, 32))])
def test_lr_is_hr_size_over_scale_in_8bit_levels(mode, scale, size):
    hr = torch.stack([_photo(*size, seed=s) for s in range(3)])
    lr, _ = degrade_batch(hr, DegradationConfig(mode=mode), scale, [0, 1, 2])
    assert lr.shape == (3, 3, size[0] // scale, size[1] // scale) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr, torch.round(lr * 255) / 255)


def test_bicubic_mode_is_pillows_bicubic_and_reports_no_degradation():
    hr = _photo(96, 128, seed=2)
    lr, params = degrade_batch(hr[None], DegradationConfig(mode="bicubic"), 4, [0])
    assert torch.equal(lr[0], bicubic_down(hr, 4))
    assert params["blur"].tolist() == [0.0] and params["noise"].tolist() == [0.0] and params["jpeg"].tolist() == [100.0]
    arr = (hr * 255).round().byte().permute(1, 2, 0).numpy()
    ref = np.asarray(Image.fromarray(arr).resize((32, 24), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    diff = np.abs(lr[0].permute(1, 2, 0).numpy() - ref)
    assert diff.max() <= 2.5 / 255 and diff.mean() < 0.5 / 255


def test_realistic_lr_is_visibly_degraded_and_varied():
    hr = _photo(128, 128, seed=3)
    clean = bicubic_down(hr, 4)
    lr, _ = degrade_batch(hr[None].repeat(8, 1, 1, 1), DegradationConfig(), 4, range(8))
    psnrs = [_psnr(x, clean) for x in lr]
    assert max(psnrs) < 45  # noise/blur/JPEG changed every LR
    assert max(psnrs) - min(psnrs) > 1.0  # and by different amounts


def _second_moments(k: torch.Tensor) -> torch.Tensor:
    r = torch.arange(k.shape[0], dtype=torch.float64) - k.shape[0] // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    k = k.double()
    return torch.tensor([[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]])


def test_kernels_follow_their_formulas():
    # an anisotropic Gaussian's covariance is U diag(sx^2, sy^2) U^T
    sx, sy, theta = 2.0, 0.8, 0.6
    k = Kernel("aniso", 21, sx, sy, theta).tensor()
    u = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    want = u @ torch.diag(torch.tensor([sx**2, sy**2], dtype=torch.float64)) @ u.T
    assert k.shape == (21, 21) and abs(float(k.sum()) - 1) < 1e-5
    assert torch.allclose(_second_moments(k), want, atol=2e-3)
    # a smaller kernel is zero-padded to 21 x 21, centred
    small = Kernel("iso", 7, 1.0, 1.0).tensor()
    assert small[:7].abs().sum() == 0 and small[7:14, 7:14].sum() > 0.99
    # plateau beta < 1 has heavier tails than the Gaussian of the same sigma; generalized beta > 1 lighter
    gauss = _second_moments(Kernel("iso", 21, 1.5, 1.5).tensor())[0, 0]
    assert _second_moments(Kernel("plateau_iso", 21, 1.5, 1.5, beta=1.0).tensor())[0, 0] > gauss
    assert _second_moments(Kernel("generalized_iso", 21, 1.5, 1.5, beta=3.0).tensor())[0, 0] < gauss
    # a sinc passes frequencies below its cut-off and stops those above
    omega = math.pi / 2
    response = torch.fft.fft2(Kernel("sinc", 21, omega=omega).tensor().double(), s=(64, 64)).abs()
    freq = 2 * math.pi * torch.arange(64) / 64
    below, above = int((freq < 0.6 * omega).sum()) - 1, int((freq < 1.4 * omega).sum())
    assert response[0, 1:below].min() > 0.9 and response[0, above:32].max() < 0.15


def _freq(values, options) -> list[int]:
    return [sum(v == o for v in values) for o in options]


def _assert_categorical(values, options, probs):
    observed = _freq(values, options)
    assert sum(observed) == len(values), f"values outside {options}"
    keep = [i for i, p in enumerate(probs) if p > 0]
    assert all(observed[i] == 0 for i, p in enumerate(probs) if p == 0)
    p = stats.chisquare([observed[i] for i in keep], [len(values) * probs[i] for i in keep]).pvalue
    assert p > 1e-4, f"{observed} vs {probs}: chi-square p = {p:.2g}"


def _assert_uniform(values, lo, hi):
    values = np.asarray(values, dtype=np.float64)
    assert values.min() >= lo and values.max() <= hi
    p = stats.kstest(values, stats.uniform(lo, hi - lo).cdf).pvalue
    assert p > 1e-4, f"not uniform on [{lo}, {hi}]: KS p = {p:.2g}"


def test_parameter_distributions_match_real_esrgan_defaults():
    """3000 draws against options/train_realesrgan_x4plus.yml + realesrgan_dataset.py + feed_data:
    every category within sampling error (chi-square), every continuous range uniform (KS)."""
    cfg = DegradationConfig()
    d = [draw(cfg, seed) for seed in range(3000)]
    kinds = KERNEL_TYPES + ("sinc",)
    mixed = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    for k in ("kernel1", "kernel2"):  # sinc 10 %, else the six families
        _assert_categorical([getattr(x, k).kind for x in d], kinds, [0.9 * p for p in mixed] + [0.1])
        _assert_categorical([getattr(x, k).size for x in d], list(range(7, 22, 2)), [1 / 8] * 8)
    _assert_uniform([x.kernel1.sigma_x for x in d if x.kernel1.kind != "sinc"], 0.2, 3.0)
    _assert_uniform([x.kernel2.sigma_x for x in d if x.kernel2.kind != "sinc"], 0.2, 1.5)
    _assert_uniform([x.kernel1.theta for x in d if x.kernel1.kind.endswith("aniso")], -math.pi, math.pi)
    betag = [x.kernel1.beta for x in d if x.kernel1.kind.startswith("generalized")]
    _assert_uniform([b for b in betag if b < 1], 0.5, 1.0)
    _assert_uniform([b for b in betag if b > 1], 1.0, 4.0)
    _assert_categorical([b < 1 for b in betag], [True, False], [0.5, 0.5])
    _assert_uniform([x.kernel1.beta for x in d if x.kernel1.kind.startswith("plateau") and x.kernel1.beta > 1], 1.0, 2.0)
    small = [x.kernel1.omega for x in d if x.kernel1.kind == "sinc" and x.kernel1.size < 13]
    _assert_uniform(small, math.pi / 3, math.pi)
    _assert_uniform([x.kernel1.omega for x in d if x.kernel1.kind == "sinc" and x.kernel1.size >= 13], math.pi / 5, math.pi)
    # resize: up / down / keep, ranges, modes
    for attr, probs, (lo, hi) in (("resize1", (0.2, 0.7, 0.1), (0.15, 1.5)), ("resize2", (0.3, 0.4, 0.3), (0.3, 1.2))):
        r = [getattr(x, attr) for x in d]
        _assert_categorical(["up" if v > 1 else "down" if v < 1 else "keep" for v in r], ["up", "down", "keep"], probs)
        _assert_uniform([v for v in r if v < 1], lo, 1.0)
        _assert_uniform([v for v in r if v > 1], 1.0, hi)
    for attr in ("mode1", "mode2", "mode3"):
        _assert_categorical([getattr(x, attr) for x in d], ["area", "bilinear", "bicubic"], [1 / 3] * 3)
    # noise: Gaussian 50 %, gray 40 %, sigma / Poisson-scale ranges per round
    for attr, sigma, scale in (("noise1", (1, 30), (0.05, 3.0)), ("noise2", (1, 25), (0.05, 2.5))):
        n = [getattr(x, attr) for x in d]
        _assert_categorical([v.gaussian for v in n], [True, False], [0.5, 0.5])
        _assert_categorical([v.gray for v in n], [True, False], [0.4, 0.6])
        _assert_uniform([v.level for v in n if v.gaussian], *sigma)
        _assert_uniform([v.level for v in n if not v.gaussian], *scale)
    _assert_uniform([x.jpeg1 for x in d], 30, 95)
    _assert_uniform([x.jpeg2 for x in d], 30, 95)
    # second blur 80 %, final sinc 80 % (cut-off uniform in [pi/3, pi]), final order 50 / 50
    _assert_categorical([x.blur2 for x in d], [True, False], [0.8, 0.2])
    _assert_categorical([x.sinc is not None for x in d], [True, False], [0.8, 0.2])
    _assert_uniform([x.sinc.omega for x in d if x.sinc], math.pi / 3, math.pi)
    _assert_categorical([x.jpeg_last for x in d], [True, False], [0.5, 0.5])


def _noise_only(**kw) -> DegradationConfig:
    base = dict(kernel_prob=(1, 0, 0, 0, 0, 0), sinc_prob=0.0, second_blur_prob=0.0, final_sinc_prob=0.0,
                resize_probs=(0, 0, 1), resize_probs2=(0, 0, 1), resize_modes=("area",), gaussian_noise_prob=1.0,
                gaussian_noise_prob2=1.0, gray_noise_prob=1.0, gray_noise_prob2=1.0, noise_sigma=(8.0, 8.0),
                noise_sigma2=(4.0, 4.0), jpeg_quality=(100.0, 100.0), jpeg_quality2=(100.0, 100.0))
    return DegradationConfig(**{**base, **kw})


def test_second_round_noise_is_added_at_lr_scale():
    """Flat grey HR, gray noise only (JPEG's 4:2:0 chroma would average colour noise): round 1 adds
    sigma 8 at HR size, which the x4 area resize to the round-2 size (= the LR size) averages down to
    8/4 = 2; round 2 adds sigma 4 there. Expected LR std sqrt(2^2 + 4^2 + 2/12) = 4.49 (the 1/12s:
    JPEG q100's rounding and the 8-bit one). Sizing round 2 relative to the current (HR) size, as the
    old pipeline did, would average round 2's noise too: 2.2."""
    hr = torch.full((8, 3, 128, 128), 0.5)
    lr, params = degrade_batch(hr, _noise_only(), 4, range(8))
    std = float((lr * 255).std())
    assert abs(std - math.sqrt(4 + 16 + 2 / 12)) < 0.1, std
    assert torch.allclose(params["noise"], torch.full((8,), math.hypot(8, 4)))
    assert float(lr.mean() * 255) == pytest.approx(127.5, abs=0.3)


def test_poisson_noise_has_real_esrgans_signal_dependent_strength():
    """Real-ESRGAN's Poisson noise: photon counts = image x vals, vals = the power of 2 above the
    number of 8-bit levels (a ramp over 154 levels: 256), so std = scale * sqrt(v / 256) * 255 at
    level v: 11.3 for the mean level 0.5 at scale 1."""
    ramp = torch.linspace(0.2, 0.8, 256).expand(4, 3, 32, 256).contiguous()
    noisy = _noise_only(gaussian_noise_prob=0.0, poisson_scale=(1.0, 1.0), noise_sigma2=(0.0, 0.0))
    lr, params = degrade_batch(ramp, noisy, 1, range(4))
    clean, _ = degrade_batch(ramp, _noise_only(gaussian_noise_prob=0.0, poisson_scale=(0.0, 0.0),
                                               noise_sigma2=(0.0, 0.0)), 1, range(4))
    want = math.sqrt(0.5 / 256) * 255
    assert params["noise1"].tolist() == pytest.approx([want] * 4, rel=0.01)
    assert float(((lr - clean) * 255).std()) == pytest.approx(want, rel=0.05)


def test_normal_noise_is_standard_normal_and_seeded():
    z = normal_noise(5, 1, (200_000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert stats.kstest(z[:20_000].numpy(), "norm").pvalue > 1e-4
    assert torch.equal(z, normal_noise(5, 1, (200_000,)))
    other = normal_noise(5, 2, (200_000,))
    assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.01


def test_usm_sharpens_edges_and_leaves_flat_areas():
    hr = _photo(64, 64, seed=4)[None]
    sharp = usm_sharpen(hr)
    grad = lambda x: float((x[..., 1:] - x[..., :-1]).abs().mean())  # noqa: E731
    assert grad(sharp) > 1.05 * grad(hr)
    flat = torch.full((1, 3, 64, 64), 0.3)
    assert torch.allclose(usm_sharpen(flat), flat)
    cfg = DegradationConfig(usm_hr=True)
    target, lr, _ = synthesize(hr, cfg, 4, [0])
    assert torch.allclose(target, sharp) and lr.shape == (1, 3, 16, 16)
    assert torch.equal(synthesize(hr, DegradationConfig(), 4, [0])[0], hr)


def test_degradation_tags_follow_the_thresholds():
    params = {"blur": torch.tensor([0.0, 2.5, 1.0, 3.0]), "noise": torch.tensor([0.0, 1.0, 20.0, 30.0]),
              "jpeg": torch.tensor([100.0, 90.0, 60.0, 35.0])}
    assert degradation_tags(params, TagThresholds()) == [
        [], ["strong blur"], ["heavy noise"], ["strong blur", "heavy noise", "jpeg artifacts"]]
    nan = torch.tensor([float("nan")])  # a real LR/HR pair: its degradation is unknown, so it earns no tag
    assert degradation_tags({"blur": nan, "noise": nan, "jpeg": nan}, TagThresholds()) == [[]]
    strict = TagThresholds(blur=0.5, noise=0.5, jpeg=95)
    assert degradation_tags(params, strict)[1] == ["strong blur", "heavy noise", "jpeg artifacts"]
    cfg = from_dict(DataConfig, {"degradation": {"tags": {"blur": 1.5, "noise": 10, "jpeg": 40}}}, prefix="data")
    assert cfg.degradation.tags == TagThresholds(1.5, 10.0, 40.0)
    # realistic draws earn each tag some of the time
    _, p = degrade_batch(torch.stack([_photo(64, 64, s) for s in range(24)]), DegradationConfig(), 4, range(24))
    tags = degradation_tags(p, TagThresholds())
    for t in ("strong blur", "heavy noise", "jpeg artifacts"):
        assert 0 < sum(t in x for x in tags) < 24, t


def test_bad_sizes_and_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by scale 4.*modcrop"):
        degrade(_photo(90, 128), DegradationConfig(), 4, seed=0)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        bicubic_down(torch.zeros(1, 32, 32), 4)
    with pytest.raises(ValueError, match="one seed per sample"):
        degrade_batch(torch.zeros(2, 3, 32, 32), DegradationConfig(), 4, [1])
    assert modcrop(_photo(90, 130), 4).shape == (3, 88, 128)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data\.crop must be a positive multiple of data\.scale=4"):
        DataConfig(crop=30)
    with pytest.raises(ValueError, match=r"data\.degradation\.jpeg_quality"):
        DegradationConfig(jpeg_quality=(0, 200))
    with pytest.raises(ValueError, match=r"data\.degradation\.resize_probs"):
        DegradationConfig(resize_probs=(0.5, 0.6, 0.1))
    with pytest.raises(ValueError, match=r"data\.degradation\.kernel_prob2 must be 6 probabilities"):
        DegradationConfig(kernel_prob2=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"data\.degradation\.betag_range must contain 1\.0"):
        DegradationConfig(betag_range=(1.5, 4.0))
    with pytest.raises(ValueError, match=r"data\.degradation\.tags\.noise"):
        TagThresholds(noise=0)
    with pytest.raises(ValueError, match=r"data\.degrade_on must be \"device\""):
        DataConfig(degrade_on="gpu")
    with pytest.raises(ValueError, match=r"data\.max_skip_fraction"):
        DataConfig(max_skip_fraction=1.5)
    with pytest.raises(ValueError, match=r"data\.s3_endpoint"):
        DataConfig(s3_endpoint="127.0.0.1:9000")
    with pytest.raises(ValueError, match="degradation.mode"):
        from_dict(DataConfig, {"degradation": {"mode": "gaussian"}}, prefix="data")
    cfg = from_dict(DataConfig, {"shards": "s3://b/p", "crop": 64, "degradation": {"jpeg_quality": [40, 90]}}, prefix="data")
    assert cfg.degradation.jpeg_quality == (40, 90) and cfg.crop == 64
