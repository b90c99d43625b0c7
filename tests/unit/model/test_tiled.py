"""Exact tiled inference: the tiled image is the untiled one; memory is bounded by a tile; where
exactness does not hold the request is refused (exact) or blended (auto). Plus batching, bf16,
and the Python API."""

import numpy as np
import pytest
import torch
from PIL import Image

from linearsr.main import main
from linearsr.model.bundle import load_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearAttention, MixFFN
from linearsr.model.tiled import splits
from linearsr.model.tiling import upscale_image
from tests.support.models import trained_like, write_moe_bundle

CFG = ModelConfig.preset("cpu_tiny", width=16, depth=2, heads=2)
TOL = 1e-4  # fp32: the attention sums are added in another order, nothing else differs


@pytest.fixture(scope="module")
def photo():
    skd = pytest.importorskip("skimage.data")
    return torch.from_numpy(skd.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float() / 255  # 128 x 128


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return load_bundle(write_moe_bundle(tmp_path_factory.mktemp("moe"), CFG, ["-inf,0", "0,inf"]))


@pytest.mark.parametrize("crop, tile, batch, steps, method, tags, guidance", [
    ((37, 29), 8, 1, 1, "euler", [], 1.0),             # odd sizes, 5 x 4 tiles of 7-8 tokens
    ((37, 29), 12, 3, 3, "heun", ["person"], 2.0),    # multi-step over both experts, tags with CFG, tiles batched
    ((64, 48), 16, 2, 2, "euler", ["space"], 1.0),
])
def test_exact_tiles_give_the_untiled_image(photo, moe, crop, tile, batch, steps, method, tags, guidance):
    lr = photo[:, : crop[0], : crop[1]]
    kw = dict(tags=tags, steps=steps, method=method, guidance=guidance, seed=3)
    whole = upscale_image(moe, lr, tile=None, **kw)
    exact = upscale_image(moe, lr, tile=tile, tile_mode="exact", batch=batch, **kw)
    assert exact.shape == whole.shape == (3, crop[0] * 4, crop[1] * 4)
    assert (exact - whole).abs().max() <= TOL
    if steps == 3:
        assert {i for _, _, i in moe.route} == {0, 1}  # the multi-step run used both experts


def test_exact_holds_with_patches_and_without_cross_attention(photo):
    """patch 2 (an HR grid padded to a multiple of 8), and blocks without tag cross-attention."""
    model = trained_like(ModelConfig.preset("cpu_tiny", width=16, depth=2, heads=2, patch_size=2))
    model.blocks[1].cross = None
    lr = photo[:, :45, :31]
    whole = upscale_image(model, lr, ["person"], steps=2, tile=None)
    exact = upscale_image(model, lr, ["person"], steps=2, tile=8, tile_mode="exact")
    assert (exact - whole).abs().max() <= TOL


def test_blend_is_what_exactness_fixes(photo):
    """The model's output depends on the global context: blended tiles change it, exact ones do not."""
    model = trained_like(CFG)
    lr = photo[:, :64, :64]
    whole = upscale_image(model, lr, tile=None)
    blend = upscale_image(model, lr, tile=24, overlap=4, tile_mode="blend")
    exact = upscale_image(model, lr, tile=24, tile_mode="exact")
    assert (blend - whole).abs().max() > 20 * TOL
    assert (exact - whole).abs().max() <= TOL


def test_exact_tiles_bound_the_memory_to_one_tile(photo, monkeypatch):
    """No whole-image attention or FFN runs: the FFN sees one tile plus its one-token halo."""
    model = trained_like(CFG)
    seen = []
    ffn_forward = MixFFN.forward

    def spy(self, x, hw):
        seen.append(x.shape[0] * x.shape[1])
        return ffn_forward(self, x, hw)

    monkeypatch.setattr(MixFFN, "forward", spy)
    monkeypatch.setattr(LinearAttention, "forward", lambda *a: pytest.fail("untiled attention ran"))
    out = upscale_image(model, photo, tile=32, tile_mode="exact")  # 128 x 128 tokens
    assert out.shape == (3, 512, 512)
    assert len(seen) == 2 * 16 and max(seen) <= 34 * 34


def test_batched_blend_tiles_give_the_same_image(photo):
    model = trained_like(CFG)
    lr = photo[:, :70, :50]
    one = upscale_image(model, lr, tile=24, overlap=4, tile_mode="blend", batch=1)
    four = upscale_image(model, lr, tile=24, overlap=4, tile_mode="blend", batch=4)
    assert (one - four).abs().max() <= 1e-5


@pytest.mark.parametrize("change, why", [({"attention": "sdpa"}, "softmax attention"), ({"mixer": "gla_bidir"}, "gla_bidir")])
def test_exact_is_refused_where_it_does_not_hold_and_auto_blends(photo, change, why):
    model = trained_like(ModelConfig.preset("cpu_tiny", width=16, depth=1, heads=2, **change))
    lr = photo[:, :40, :40]
    with pytest.raises(ValueError, match=f"exact does not hold for this bundle: .*{why}.*; use --tile-mode blend"):
        upscale_image(model, lr, tile=16, tile_mode="exact")
    auto = upscale_image(model, lr, tile=16, overlap=4)
    assert torch.equal(auto, upscale_image(model, lr, tile=16, overlap=4, tile_mode="blend"))


def test_splits_are_near_equal_and_cover():
    for size, tile in [(100, 32), (7, 8), (64, 16), (33, 8)]:
        spans = splits(size, tile)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        lengths = {hi - lo for lo, hi in spans}
        assert max(lengths) <= tile and max(lengths) - min(lengths) <= 1


def test_bf16_is_close_to_fp32(photo):
    """bf16 weights and activations (attention state fp32) against fp32: measured 0.045/255 at most and
    0.0045/255 on average; the bound is 10x that, and far below the model's own change over bicubic."""
    from linearsr import Upscaler

    model = trained_like(CFG)
    fp32 = Upscaler(model, dtype="fp32")(photo, tile=0)
    bf16 = Upscaler(trained_like(CFG), dtype="bf16")(photo, tile=32)  # tiled exactly too
    diff = (bf16 - fp32).abs()
    assert diff.max() <= 0.5 / 255 and diff.mean() <= 0.05 / 255
    bicubic = torch.nn.functional.interpolate(photo[None], scale_factor=4, mode="bicubic").clamp(0, 1)[0]
    assert (fp32 - bicubic).abs().mean() > 20 * diff.mean()


def test_python_api_returns_the_kind_it_was_given(tmp_path, moe, photo):
    from linearsr import Upscaler, upscale

    img = Image.fromarray((photo[:, :30, :20].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    out = upscale(moe, img, steps=2, tags="person, space")
    assert isinstance(out, Image.Image) and out.size == (80, 120)
    arr = Upscaler(moe)(np.asarray(img), steps=2, tags=["person", "space"])
    assert arr.dtype == np.uint8 and np.array_equal(arr, np.asarray(out))
    # the command line writes the same pixels
    img.save(tmp_path / "a.png")
    moe_dir = tmp_path / "bundle"
    write_moe_bundle(moe_dir, CFG, ["-inf,0", "0,inf"])
    assert main(["upscale", "--bundle", str(moe_dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
                 "--steps", "2", "--tags", "person, space", "--dtype", "bf16", "--batch", "2"]) == 0
    cli = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert cli.shape == arr.shape and np.abs(cli.astype(int) - arr.astype(int)).max() <= 2  # bf16 vs fp32
