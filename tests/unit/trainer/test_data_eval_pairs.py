"""`linearsr eval` on real LR images: a paired folder (metrics against the HR, bad pairs named and
counted) and an LR-only folder (outputs and timing, no metrics)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from test_evaluate import tiny_bundle  # noqa: F401  (the fixture: a fresh cpu_tiny bundle)

from linearsr.main import main


@pytest.fixture(scope="module")
def bundle(tiny_bundle):  # noqa: F811  (the fixture imported above)
    return str(tiny_bundle)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """hr/: coffee, chelsea, rocket; lr/: coffee (x4 box), chelsea (x4 box, a JPEG), rocket at x2, a stray."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "hr").mkdir()
    (root / "lr").mkdir()
    for name, img in (("coffee", data.coffee()), ("chelsea", data.chelsea()), ("rocket", data.rocket())):
        hr = Image.fromarray(img[:96, :128])
        hr.save(root / "hr" / f"{name}.png")
        factor = 2 if name == "rocket" else 4
        lr = hr.resize((128 // factor, 96 // factor), Image.Resampling.BOX)
        lr.save(root / "lr" / (f"{name}.jpg" if name == "chelsea" else f"{name}.png"), quality=98)
    Image.fromarray(data.astronaut()[:32, :32]).save(root / "lr" / "stray.png")
    return root


def test_paired_eval_measures_the_real_lr_and_names_bad_pairs(bundle, folders, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--bundle", bundle, "--hr", str(folders / "hr"), "--lr", str(folders / "lr"),
                 "--out", str(out), "--steps", "2", "--no-tb"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_image"]) == {"coffee", "chelsea"} and m["degradation"] == "real"
    bad = {b["source"].rsplit("/", 1)[-1]: b["error"] for b in m["bad_pairs"]}
    assert set(bad) == {"rocket.png", "stray.png"}
    assert "is not the bundle's x4" in bad["rocket.png"] and "without an HR image" in bad["stray.png"]
    assert "2 bad LR/HR pairs skipped: " in (out / "report.md").read_text()
    # the bicubic row upscales the given LR, not one synthesised from the HR
    from linearsr.trainer.evaluate import bicubic_up
    from linearsr.trainer.quality import psnr_y

    def load(path):
        return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    want = psnr_y(bicubic_up(load(folders / "lr" / "coffee.png"), 4), load(folders / "hr" / "coffee.png"), border=4)
    assert m["per_image"]["coffee"]["bicubic"]["psnr_y"] == pytest.approx(want, abs=1e-4)


def test_lr_only_eval_writes_outputs_and_timing(bundle, folders, tmp_path, capsys):
    out = tmp_path / "lr_only"
    assert main(["eval", "--bundle", bundle, "--lr", str(folders / "lr"), "--out", str(out), "--steps", "2"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["per_image"]) == {"coffee", "chelsea", "rocket", "stray"}
    assert m["summary"]["1nfe"]["nfe"] == 1 and m["summary"]["2step"]["seconds"] > 0
    with Image.open(out / "sr" / "rocket.1nfe.png") as sr:
        assert sr.size == (64 * 4, 48 * 4)
    assert "no HR reference" in (out / "report.md").read_text()
    assert main(["eval", "--bundle", bundle, "--out", str(out)]) == 1
    assert "--lr alone (LR-only)" in capsys.readouterr().err
