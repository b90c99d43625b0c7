"""The flow's space: lossless pixel-unshuffle, and a diffusers latent autoencoder from a folder."""

import sys

import pytest
import torch

from linearsr.model.autoencoder import LatentAutoencoder, PixelAutoencoder
from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearSR
from linearsr.model.sampler import sample


def test_pixel_space_is_lossless():
    ae = PixelAutoencoder(4)
    x = torch.rand(2, 3, 16, 24)
    z = ae.encode(x)
    assert z.shape == (2, 48, 4, 6) and ae.channels == 48 and ae.factor == 4
    assert torch.equal(ae.decode(z), x)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_latent_autoencoder_fits_the_model(tiny_vae_dir):
    cfg = ModelConfig.preset("cpu_tiny", width=16, depth=1, heads=2, autoencoder="latent", ae_path=str(tiny_vae_dir),
                             residual_scale=1.0)
    model = LinearSR(cfg)
    assert (model.ae.factor, model.ae.channels) == (2, 4)
    assert not any(k.startswith("_ae") or "vae" in k for k in model.state_dict())  # frozen, not saved
    lr, hr = torch.rand(2, 3, 5, 7), torch.rand(2, 3, 20, 28)
    loss = model.loss(hr, lr, [[], ["cat"]], torch.tensor([0.3, 0.8]))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.final.weight.grad.abs().sum() > 0
    res = sample(model, lr, steps=2)
    assert res.image.shape == (2, 3, 20, 28) and 0 <= res.image.min() and res.image.max() <= 1
    # the data path is encode -> decode: the target of an HR image decodes to the VAE's reconstruction of it
    recon = ((model.ae.decode(model.ae.encode(hr * 2 - 1)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(model.decode(model.target(hr, lr), lr), recon, atol=1e-4, rtol=0)


def test_latent_errors(tmp_path, monkeypatch, tiny_vae_dir):
    with pytest.raises(FileNotFoundError, match="has no config.json.*model.autoencoder=pixel"):
        LatentAutoencoder.load(tmp_path / "no_vae")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'linearsr\[latent\]'"):
        LatentAutoencoder.load(tiny_vae_dir)


@pytest.fixture(scope="module")
def tiny_dcae_dir(tmp_path_factory):
    """An AutoencoderDC (the DC-AE class of the latent preset) with random weights, saved as a folder."""
    diffusers = pytest.importorskip("diffusers")
    from linearsr.model.autoencoder import TINY_DC_AE

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dcae")
    diffusers.AutoencoderDC(**TINY_DC_AE).save_pretrained(path)
    return path


def test_latent_bundle_shares_one_autoencoder_and_tiles_the_network_exactly(tiny_dcae_dir, tmp_path):
    import shutil

    from linearsr.model.bundle import load_bundle
    from linearsr.model.tiling import upscale_image
    from tests.support.models import write_moe_bundle

    ae_dir = shutil.copytree(tiny_dcae_dir, tmp_path / "ae")
    cfg = ModelConfig.preset("cpu_tiny", width=16, depth=2, heads=2, autoencoder="latent", ae_path=str(ae_dir),
                             residual_scale=2.0)
    write_moe_bundle(tmp_path / "bundle", cfg, ["-inf,0", "0,inf"])
    moe = load_bundle(tmp_path / "bundle")
    assert moe.experts[0].ae is moe.experts[1].ae and (moe.experts[0].ae.factor, moe.experts[0].ae.channels) == (2, 8)
    lr = torch.rand(3, 21, 17, generator=torch.Generator().manual_seed(0))
    whole = upscale_image(moe, lr, ["cat"], steps=2, tile=None)
    exact = upscale_image(moe, lr, ["cat"], steps=2, tile=8, tile_mode="exact")  # the DiT tiled, the DC-AE whole
    assert whole.shape == (3, 84, 68) and (exact - whole).abs().max() <= 1e-4
    # the autoencoder is elsewhere on this machine: ae_path (upscale --ae-path) points at it
    moved = ae_dir.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_bundle(tmp_path / "bundle")
    assert load_bundle(tmp_path / "bundle", ae_path=str(moved)).experts[0].ae.factor == 2
    write_moe_bundle(tmp_path / "pixel", ModelConfig.preset("cpu_tiny", width=16, depth=1), ["-inf,inf"])
    with pytest.raises(ValueError, match="works in pixel space"):
        load_bundle(tmp_path / "pixel", ae_path=str(moved))
