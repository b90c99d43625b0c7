"""`linearsr upscale` on a real photo with a freshly initialised bundle, bad inputs, tiling, tags."""

import logging
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from linearsr.main import main
from linearsr.model.bundle import save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.network import LinearSR
from linearsr.model.tagger import Tagger
from linearsr.model.tiling import tile_starts, upscale_image
from tests.support import models as support_models

CFG = ModelConfig.preset("cpu_tiny", width=16, depth=1, heads=2)


@pytest.fixture(scope="module")
def astronaut_lr():
    skd = pytest.importorskip("skimage.data")
    hr = Image.fromarray(skd.astronaut())
    return hr.resize((96, 96), Image.BICUBIC)


@pytest.fixture
def bundle(tmp_path):
    torch.manual_seed(0)
    save_expert(tmp_path / "bundle" / "expert_0", LinearSR(CFG), {"step": 0})
    write_bundle(tmp_path / "bundle", [{"interval": "-inf,inf", "weights": "expert_0.safetensors"}], CFG)
    return tmp_path / "bundle"


def upscale(*args) -> int:
    return main(["upscale", *map(str, args)])


def test_fresh_bundle_upscales_a_real_photo_to_bicubic(tmp_path, bundle, astronaut_lr):
    astronaut_lr.save(tmp_path / "astronaut.png")
    assert upscale("--bundle", bundle, tmp_path / "astronaut.png", "--out", tmp_path / "out") == 0
    out = np.asarray(Image.open(tmp_path / "out" / "astronaut.png"))
    assert out.shape == (384, 384, 3) and out.dtype == np.uint8
    # a fresh model predicts a zero residual: its 1-step output is the bicubic upscale
    lr = torch.from_numpy(np.array(astronaut_lr)).permute(2, 0, 1)[None].float() / 255
    up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    ref = (up[0].permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_single_expert_file_works_as_a_bundle(tmp_path, bundle, astronaut_lr):
    astronaut_lr.resize((30, 20)).save(tmp_path / "a.jpg")
    assert upscale("--bundle", bundle / "expert_0.safetensors", tmp_path / "a.jpg", "--out", tmp_path, "--steps", "2",
                   "--sampler", "heun") == 0
    assert Image.open(tmp_path / "a.png").size == (120, 80)


def test_bad_inputs_get_a_message_each_and_the_rest_is_processed(tmp_path, bundle, astronaut_lr, caplog):
    caplog.set_level(logging.INFO)
    rgb = astronaut_lr.resize((24, 16))
    rgb.save(tmp_path / "good.png")
    rgb.convert("L").save(tmp_path / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.save(tmp_path / "opaque.png")
    rgba.putalpha(128)
    rgba.save(tmp_path / "transparent.png")
    Image.fromarray((np.arange(16 * 24).reshape(16, 24) * 170).astype(np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    names = ["good", "gray", "opaque", "transparent", "deep", "notes", "cut", "missing"]
    rc = upscale("--bundle", bundle, *[tmp_path / f"{n}.png" for n in names], "--out", tmp_path / "out")
    assert rc == 1
    written = sorted(p.stem for p in (tmp_path / "out").glob("*.png"))
    assert written == ["deep", "good", "gray", "opaque"]
    assert all(Image.open(tmp_path / "out" / f"{n}.png").size == (96, 64) for n in written)
    text = caplog.text
    assert "gray.png: grayscale: converted to RGB" in text
    assert "opaque.png: RGBA with an opaque alpha channel: alpha dropped" in text
    assert "deep.png: 16-bit grayscale" in text
    assert "transparent.png: has transparent pixels" in text
    assert "notes.png: is not an image file" in text
    assert "cut.png: is truncated or corrupt" in text
    assert "missing.png: no such file" in text
    assert not list((tmp_path / "out").glob(".*"))  # no half-written files


def test_missing_bundle_is_one_line_error(tmp_path, capsys, astronaut_lr):
    astronaut_lr.resize((8, 8)).save(tmp_path / "a.png")
    assert upscale("--bundle", tmp_path / "nope", tmp_path / "a.png", "--out", tmp_path) == 1
    assert "error: bundle" in capsys.readouterr().err


def test_tags_from_flag_bundle_tagger_and_external_tagger(tmp_path, bundle, astronaut_lr, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    astronaut_lr.resize((32, 32)).save(tmp_path / "a.png")
    assert upscale("--bundle", bundle, tmp_path / "a.png", "--out", tmp_path / "o1", "--tags", "Person, space , person",
                   "--guidance", "2") == 0
    assert "tags: person, space" in caplog.text
    # a bundle with a tagger: used when no --tags is given
    tagger = Tagger(["astronaut", "cat"])
    with torch.no_grad():
        tagger.head.weight.zero_()
        tagger.head.bias.copy_(torch.tensor([5.0, -5.0]))
    tagger.save(bundle / "tagger")
    write_bundle(bundle, [{"interval": "-inf,inf", "weights": "expert_0.safetensors"}], CFG, tagger="tagger.safetensors")
    caplog.clear()
    assert upscale("--bundle", bundle, tmp_path / "a.png", "--out", tmp_path / "o2") == 0
    assert "tags: astronaut" in caplog.text
    # an external tagger: module:function taking a PIL image
    (tmp_path / "mytagger.py").write_text(textwrap.dedent("""
        def tag(image):
            return ["wide" if image.width > image.height else "square", "Photo"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    caplog.clear()
    assert upscale("--bundle", bundle, tmp_path / "a.png", "--out", tmp_path / "o3", "--tagger", "mytagger:tag") == 0
    assert "tags: square, photo" in caplog.text
    assert upscale("--bundle", bundle, tmp_path / "a.png", "--out", tmp_path / "o3", "--tagger", "mytagger") == 1


def test_a_failing_external_tagger_costs_its_image_not_the_batch(tmp_path, bundle, astronaut_lr, caplog, monkeypatch):
    astronaut_lr.resize((16, 16)).save(tmp_path / "small.png")
    astronaut_lr.resize((32, 24)).save(tmp_path / "wide.png")
    (tmp_path / "picky.py").write_text(textwrap.dedent("""
        def tag(image):
            if image.width == 16:
                raise RuntimeError("model not loaded")
            return ["wide"]

        def count(image):
            return 5
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert upscale("--bundle", bundle, tmp_path / "small.png", tmp_path / "wide.png", "--out", out,
                   "--tagger", "picky:tag") == 1
    assert "small.png: the tagger failed (RuntimeError: model not loaded)" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["wide.png"]
    caplog.clear()
    assert upscale("--bundle", bundle, tmp_path / "wide.png", "--out", out, "--tagger", "picky:count") == 1
    assert "returned 5; it must return a list of strings" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--tile", "4"], "--tile 4: tiles need tile >= 8 LR pixels, or --tile 0 for no tiling"),
    (["--tile", "8", "--tile-mode", "blend"], "--tile 8 --overlap 16: blended tiles need tile >= 8 and 0 <= overlap < tile/2"),
    (["--tile", "200", "--overlap", "150", "--tile-mode", "blend"], "0 <= overlap < tile/2"),
    (["--batch", "0"], "--batch must be >= 1 tile, got 0"),
    (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 needs a CUDA GPU"),
])
def test_impossible_tiling_is_refused_before_any_work(tmp_path, bundle, astronaut_lr, capsys, args, message):
    astronaut_lr.resize((16, 16)).save(tmp_path / "a.png")
    assert upscale("--bundle", bundle, tmp_path / "a.png", "--out", tmp_path / "out", *args) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_one_line_and_overwrites_nothing(tmp_path, bundle, astronaut_lr, capsys):
    astronaut_lr.resize((16, 16)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("keep me")
    assert upscale("--bundle", bundle, tmp_path / "a.png", "--out", tmp_path / "notes.txt") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"linearsr upscale: error: --out {tmp_path / 'notes.txt'} is a file; give a folder for the upscaled images"
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def trained_like(seed=0) -> LinearSR:
    return support_models.trained_like(CFG, seed)


def test_blended_tiles_match_untiled_except_slightly_near_seams(astronaut_lr):
    model = trained_like()
    lr = torch.from_numpy(np.array(astronaut_lr)).permute(2, 0, 1).float() / 255  # 96 x 96
    whole = upscale_image(model, lr, tile=None)
    tiled = upscale_image(model, lr, tile=40, overlap=8, tile_mode="blend")  # 3 x 3 tiles
    assert tiled.shape == whole.shape == (3, 384, 384)
    diff = (tiled - whole).abs()
    assert diff.mean() < 2e-3 and diff.max() < 0.05
    bicubic_gap = (whole - F.interpolate(lr[None], scale_factor=4, mode="bicubic").clamp(0, 1)[0]).abs().mean()
    assert diff.mean() < 0.2 * bicubic_gap  # the model's own contribution is much larger than the tiling error


def test_tile_starts_cover_with_overlap():
    for size, tile, overlap, align in [(1000, 256, 16, 1), (750, 256, 16, 2), (257, 256, 16, 4), (100, 256, 16, 1)]:
        starts = tile_starts(size, tile, overlap, align)
        assert starts[0] == 0 and starts[-1] + tile >= size and all(s % align == 0 for s in starts)
        assert all(b - a <= tile - overlap for a, b in zip(starts[:-1], starts[1:]))


def test_huge_image_stays_within_the_blend_tile_budget(monkeypatch):
    """1000 x 750 LR -> 4000 x 3000: the network never sees more than one tile."""
    model = LinearSR(CFG).eval()
    seen = []

    def spy(self, x_t, t, cond, tags):  # records the network's input size; skips its cost
        seen.append(tuple(x_t.shape[-2:]))
        return torch.zeros_like(x_t)

    monkeypatch.setattr(LinearSR, "forward", spy)
    out = upscale_image(model, torch.rand(3, 750, 1000), tile=256, overlap=16, tile_mode="blend")
    assert out.shape == (3, 3000, 4000)
    assert len(seen) == 5 * 4 and max(h * w for h, w in seen) <= 256 * 256  # latent grid = LR grid for x4, f=4
