"""The core alone (`pip install linearsr`, no extras) in a fresh venv: none of the training stack comes
with it, and `linearsr upscale` upscales a PNG with an exported bundle (issue 14, dependencies sized to
the job).

The install is offline: `pip install --no-index --find-links .cache/core-wheels -c constraints.txt`,
from the wheels that `make setup` downloads there (torch is the same local CPU wheel as .venv's), with
no pip configuration of this machine (PIP_CONFIG_FILE=/dev/null, no PIP_* variables). LinearSR is
built from a copy of the working tree (pip builds a local folder in place: the copy keeps build/ out of
the checkout). Where a wheel is missing the tests skip with its name."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linearsr.model.config import ModelConfig
from tests.support.models import write_moe_bundle

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".cache" / "core-wheels"  # CORE_WHEELS in the Makefile
CONSTRAINTS = ROOT / "constraints.txt"
TRAIN_ONLY = ("ray", "deepspeed", "webdataset", "s3fs")  # [train]: none of them may come with the core
# the hash tag encoder: a bundle that needs no [tags] extra (MiniLM is the default)
CFG = ModelConfig.preset("cpu_tiny", width=16, depth=1, heads=2, tag_encoder="hash")
# top-level entries of the checkout that are not LinearSR's source (venvs, caches, run outputs, leftovers)
NOT_SOURCE = {".git", ".venv", ".cache", "runs", "build", "dist", ".pytest_cache", ".hypothesis", ".ruff_cache"}


def _env() -> dict[str, str]:
    """This process's environment without anything that points pip or Python elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no pip.conf: no machine-wide index, find-links or constraint
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-n:]}\n--- stderr\n{proc.stderr[-n:]}"


def _copy_source(dest: Path) -> Path:
    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
        return skip | (NOT_SOURCE & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages, no pip of its own) with LinearSR's core installed offline;
    returns its bin/ folder."""
    if not list(WHEELS.glob("torch-*.whl")):
        pytest.skip(f"no torch wheel in {os.path.relpath(WHEELS, ROOT)}: "
                    "`make setup` downloads the core's wheels there")
    base = tmp_path_factory.mktemp("core")
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base, timeout=60)
    assert made.returncode == 0, _tail(made)
    src = _copy_source(base / "src")
    # this interpreter's pip installs into the venv (--python): the venv needs no pip, and --no-compile
    # leaves the bytecode to the imports that happen (the two save ~15 s of a ~25 s install)
    install = _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet",
                    "--no-compile", "--no-index", "--find-links", WHEELS, "-c", CONSTRAINTS, src],
                   cwd=base, timeout=600)
    if install.returncode != 0:
        missing = re.search(r"No matching distribution found for (\S+)", install.stdout + install.stderr)
        if missing:
            pytest.skip(f"{missing.group(1)} is not in {os.path.relpath(WHEELS, ROOT)} for the offline core install: "
                        "`make setup` downloads the core's wheels there")
        pytest.fail(f"the offline core install failed:\n{_tail(install)}")
    return venv / "bin"


def test_the_core_install_has_no_training_stack(core_venv, tmp_path):
    probe = ("import importlib, json, linearsr\n"
             "got = []\n"
             f"for name in {TRAIN_ONLY!r}:\n"
             "    try:\n"
             "        importlib.import_module(name)\n"
             "        got.append(name)\n"
             "    except ImportError:\n"
             "        pass\n"
             "print(json.dumps({'imported': got, 'linearsr': linearsr.__file__}))\n")
    proc = _run([core_venv / "python", "-c", probe], cwd=tmp_path)
    assert proc.returncode == 0, _tail(proc)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported"] == [], f"the core install brings the [train] packages {out['imported']}"
    assert Path(out["linearsr"]).is_relative_to(core_venv.parent), f"linearsr came from {out['linearsr']}, not the venv"


def test_upscale_help_runs_on_the_core(core_venv, tmp_path):
    proc = _run([core_venv / "linearsr", "upscale", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, f"`linearsr upscale --help` on the core install:\n{_tail(proc)}"
    assert "--bundle" in proc.stdout


def test_upscale_writes_the_4x_png_on_the_core(core_venv, tmp_path):
    bundle = write_moe_bundle(tmp_path / "bundle", CFG, ["-inf,inf"])
    rng = np.random.default_rng(0)
    coarse = (rng.random((4, 6, 3)) * 255).astype(np.uint8)
    Image.fromarray(coarse).resize((24, 16), Image.Resampling.BICUBIC).save(tmp_path / "small.png")
    proc = _run([core_venv / "linearsr", "upscale", "--bundle", bundle, tmp_path / "small.png",
                 "--out", tmp_path / "out"], cwd=tmp_path)
    assert proc.returncode == 0, f"`linearsr upscale` on the core install:\n{_tail(proc)}"
    with Image.open(tmp_path / "out" / "small.png") as out:
        assert out.size == (96, 64) and out.mode == "RGB"
