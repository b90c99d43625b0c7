"""Tags must change what a trained model does. A tiny LinearSR is trained on images whose HR
carries fine stripes exactly when the tag says "stripes": bicubic x1/4 wipes them from the LR, so
only the tag can tell. Conditional and unconditional predictions must then differ, guidance must
move the output monotonically in its scale, and `linearsr eval`'s TAG ablation must see it."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from linearsr.main import main
from linearsr.model.bundle import save_expert, write_bundle
from linearsr.model.config import ModelConfig
from linearsr.model.flow import FULL_RANGE, FlowConfig
from linearsr.model.network import LinearSR
from linearsr.model.sampler import sample
from linearsr.model.tagger import Tagger

SIZE = 32


def stripes(n: int) -> torch.Tensor:
    """Vertical lines 2 HR pixels apart, +-0.08: above the LR's Nyquist frequency."""
    x = torch.arange(SIZE)
    return (0.08 * (1 - 2 * (x % 2)).float()).expand(n, 3, SIZE, SIZE)


def smooth_images(n: int, gen: torch.Generator) -> torch.Tensor:
    coarse = 0.3 + 0.4 * torch.rand(n, 3, 4, 4, generator=gen)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0.1, 0.9)


def down(hr: torch.Tensor) -> torch.Tensor:
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (lr * 255).round() / 255


def batch(n: int, gen: torch.Generator):
    striped = torch.rand(n, generator=gen) < 0.5
    hr = (smooth_images(n, gen) + striped.view(-1, 1, 1, 1) * stripes(n)).clamp(0, 1)
    return hr, down(hr), [["stripes"] if s else ["smooth"] for s in striped.tolist()]


def stripe_energy(img: torch.Tensor) -> float:
    """Mean correlation of an image batch with the stripe pattern."""
    return float(((img - img.mean((2, 3), keepdim=True)) * stripes(img.shape[0])).mean() / 0.08**2)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = LinearSR(ModelConfig.preset("cpu_tiny", width=32, depth=2, heads=1, tag_dropout=0.2,
                                        tag_set=["smooth", "stripes"]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    flow = FlowConfig(shift=3.0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    for _ in range(250):
        hr, lr, tags = batch(8, gen)
        loss = model.loss(hr, lr, tags, flow.sample_t(8, generator=gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(n)
    return model.eval()


def test_a_trained_model_uses_its_tags_and_guidance_scales_the_effect(trained):
    gen = torch.Generator().manual_seed(1)
    hr = smooth_images(4, gen) + stripes(4)
    lr = down(hr.clamp(0, 1))
    for steps in (1, 4):
        images = {g: sample(trained, lr, [["stripes"]] * 4, steps=steps, guidance=g).image
                  for g in (0.0, 1.0, 2.0, 3.0)}  # guidance 0 = the unconditional prediction
        torch.testing.assert_close(images[0.0], sample(trained, lr, [[]] * 4, steps=steps).image)
        assert (images[1.0] - images[0.0]).abs().max() > 0.005, steps  # conditional != unconditional
        energy = {g: stripe_energy(img) for g, img in images.items()}
        smooth = stripe_energy(sample(trained, lr, [["smooth"]] * 4, steps=steps).image)
        assert energy[1.0] - smooth > 0.5, (steps, smooth, energy)  # the tag decides
        assert energy[0.0] < energy[1.0] < energy[2.0] < energy[3.0], (steps, energy)  # guidance pushes further, in order


def test_eval_reports_the_tag_ablation(trained, tmp_path):
    bundle = tmp_path / "bundle"
    save_expert(bundle / "model", trained, {"step": 250})
    tagger = Tagger(["stripes", "smooth"], thresholds=[0.0, 0.0])  # says "stripes" for every image
    with torch.no_grad():
        tagger.head.weight.zero_()
        tagger.head.bias.copy_(torch.tensor([5.0, -5.0]))
    tagger.save(bundle / "tagger")
    write_bundle(bundle, [{"interval": FULL_RANGE.key, "weights": "model.safetensors"}], trained.cfg, tagger="tagger.safetensors")
    hr_dir = tmp_path / "hr"
    hr_dir.mkdir()
    gen = torch.Generator().manual_seed(2)
    for i, img in enumerate((smooth_images(3, gen) + stripes(3)).clamp(0, 1)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(hr_dir / f"s{i}.png")
    out = tmp_path / "eval"
    assert main(["eval", "--bundle", str(bundle), "--hr", str(hr_dir), "--out", str(out), "--steps", "4", "--no-tb",
                 "--ablation-guidance", "2"]) == 0
    s = json.loads((out / "metrics.json").read_text())["summary"]
    for label in ("1-NFE", "4-step"):
        own, none = s[f"LinearSR {label}"]["psnr_y"], s[f"LinearSR {label}, no tags"]["psnr_y"]
        wrong = s[f"LinearSR {label}, shuffled tags"]["psnr_y"]  # every image says stripes: the wrong tag is "smooth"
        assert own > none > wrong, (label, own, none, wrong)
        assert s[f"LinearSR {label}, CFG 2"]["psnr_y"] != own
    assert "| LinearSR 4-step, shuffled tags |" in (out / "report.md").read_text()
