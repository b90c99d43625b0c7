"""Checkpoints: RUN/checkpoints/checkpoint_XXXXXX/ (XXXXXX = optimizer step).

    ds/...                      DeepSpeed shards of every rank (engine.save_checkpoint, tag "ds")
    meta.json                   step, samples, config, val loss, the metrics record of this step
    state_rank<R>.json          per-rank RNG + data-stream state
    ema.safetensors             EMA weights (when optim.ema_decay > 0)
    COMPLETE                    written LAST, by rank 0, after every rank's files are in storage

Each rank saves into a local temp dir and hands it to `ray.train.report`, which uploads it into
the same storage folder; the upload goes through `upload_dir` (s3 requests retried and counted).
A folder without COMPLETE is a save that was interrupted: resume skips it, says so, and deletes
it. Retention (`checkpoint.keep`) only deletes checkpoints that are neither among the last N nor
the best validation loss so far."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

from linearsr.trainer import rundir

log = logging.getLogger(__name__)

TAG = "ds"
META = "meta.json"
MARKER = "COMPLETE"
EMA_FILE = "ema.safetensors"
_NAME_RE = re.compile(r"^checkpoint_(\d{6,})$")


def name_of(step: int) -> str:
    return f"checkpoint_{step:06d}"


def url_of(run_url: str, step: int) -> str:
    return rundir.join(run_url, "checkpoints", name_of(step))


def state_file(rank: int) -> str:
    return f"state_rank{rank}.json"


# --------------------------------------------------------------------------- storage helpers


def _fs(url: str):
    """(filesystem, path); s3 goes through linearsr.data.s3 (retries counted there)."""
    from linearsr.data.s3 import filesystem

    return filesystem(url)


def _retry(fn, what: str):
    from linearsr.data.s3 import with_retries

    return with_retries(fn, what)


def upload_dir(local_dir: str, dest_url: str) -> list[str]:
    """Copy every file under local_dir into dest_url (created); each file retried on transient
    storage errors. Returns the relative paths copied."""
    fs, dest = _fs(dest_url)
    rels = []
    for root, _, files in os.walk(local_dir):
        for f in files:
            rels.append(os.path.relpath(os.path.join(root, f), local_dir).replace(os.sep, "/"))
    for rel in sorted(rels):
        src, target = os.path.join(local_dir, rel), f"{dest.rstrip('/')}/{rel}"
        if rundir.is_local(dest_url):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        else:
            _retry(lambda: fs.put_file(src, target), f"upload {rel} to {dest_url}")
    return rels


def download_dir(url: str, local_dir: str) -> str:
    """A checkpoint folder as a local path: local URLs are used in place, remote ones copied."""
    if rundir.is_local(url):
        return rundir.local_path(url)
    fs, path = _fs(url)
    files = _retry(lambda: fs.find(path), f"list {url}")
    for remote in files:
        rel = remote[len(path.rstrip("/")) + 1:]
        target = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _retry(lambda: fs.get_file(remote, target), f"download {rel} from {url}")
    return local_dir


def _exists(url: str) -> bool:
    fs, path = _fs(url)
    return _retry(lambda: fs.exists(path), f"check {url}")


def _remove(url: str) -> None:
    fs, path = _fs(url)
    if _retry(lambda: fs.exists(path), f"check {url}"):
        _retry(lambda: fs.rm(path, recursive=True), f"delete {url}")


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Found:
    step: int
    url: str
    complete: bool


def list_checkpoints(run_url: str) -> list[Found]:
    """Every checkpoint folder under RUN/checkpoints, oldest first, with its completeness."""
    root = rundir.join(run_url, "checkpoints")
    fs, path = _fs(root)
    try:
        entries = _retry(lambda: fs.ls(path, detail=False), f"list {root}")
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        m = _NAME_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m:
            url = rundir.join(root, m.group(0))
            found.append(Found(int(m.group(1)), url, _exists(rundir.join(url, MARKER))))
    return sorted(found, key=lambda f: f.step)


def is_complete(ckpt_url: str) -> bool:
    """True when the checkpoint's COMPLETE marker exists (every rank's files were stored)."""
    return _exists(rundir.join(ckpt_url, MARKER))


def latest_complete(run_url: str, remove_incomplete: bool = False) -> Found | None:
    """The newest complete checkpoint. Newer incomplete ones are logged as skipped (and deleted
    with `remove_incomplete`, so a resumed run can save that step again cleanly)."""
    found = list_checkpoints(run_url)
    best = None
    for f in reversed(found):
        if f.complete:
            best = f
            break
        log.warning("skipping checkpoint %s: no %s marker, its save was interrupted (a worker died while "
                    "writing); resuming from an earlier one", f.url, MARKER)
        if remove_incomplete:
            _remove(f.url)
    return best


def read_meta(ckpt_url: str) -> dict:
    try:
        return rundir.read_json(rundir.join(ckpt_url, META))
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_url} is not a LinearSR checkpoint (no {META})") from None


def require_complete(ckpt_url: str) -> None:
    """Raise a one-line error unless ckpt_url is a complete checkpoint."""
    if not _exists(rundir.join(ckpt_url, META)):
        raise FileNotFoundError(f"{ckpt_url} is not a checkpoint folder (no {META}); "
                                f"checkpoints are RUN/checkpoints/checkpoint_XXXXXX")
    if not is_complete(ckpt_url):
        raise ValueError(f"checkpoint {ckpt_url} is incomplete (no {MARKER} marker: its save was interrupted); "
                         "choose an earlier one")


# --------------------------------------------------------------------------- RNG / per-rank state


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rank_state(generator: torch.Generator, extra: dict[str, Any]) -> dict[str, Any]:
    """The random streams of one rank: its t generator, torch's (noise) and Python's (tag dropout)."""
    version, internal, gauss = random.getstate()
    return {"generator": _b64(generator.get_state()), "torch": _b64(torch.get_rng_state()),
            "python": [version, list(internal), gauss], **extra}


def restore_rank_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(_unb64(state["generator"]))
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- retention


def to_delete(checkpoints: list[tuple[int, float]], keep: int | None) -> list[int]:
    """Steps to delete given (step, val_loss) of the complete checkpoints, oldest first: all but
    the last `keep` and the one with the lowest finite val loss. keep=None deletes nothing."""
    if keep is None or len(checkpoints) <= keep:
        return []
    finite = [(v, s) for s, v in checkpoints if v is not None and math.isfinite(v)]
    best = min(finite)[1] if finite else None
    recent = {s for s, _ in checkpoints[-keep:]}
    return [s for s, _ in checkpoints if s not in recent and s != best]


def apply_retention(run_url: str, keep: int | None) -> list[int]:
    if keep is None:
        return []
    complete = [f for f in list_checkpoints(run_url) if f.complete]
    losses = [(f.step, _val_loss(f.url)) for f in complete]
    doomed = to_delete(losses, keep)
    for step in doomed:
        log.info("retention (checkpoint.keep=%d): deleting %s", keep, url_of(run_url, step))
        _remove(url_of(run_url, step))
    return doomed


def _val_loss(ckpt_url: str) -> float | None:
    try:
        v = read_meta(ckpt_url).get("val_loss")
    except FileNotFoundError:
        return None
    return None if v is None else float(v)


def write_marker(ckpt_url: str, files: list[str]) -> None:
    """Rank 0, after every rank's upload: check the files are there, then write COMPLETE."""
    fs, path = _fs(ckpt_url)
    present = {p[len(path.rstrip("/")) + 1:] for p in _retry(lambda: fs.find(path), f"list {ckpt_url}")}
    missing = sorted(set(files) - present)
    if missing:
        raise OSError(f"checkpoint {ckpt_url} lacks {len(missing)} file(s) after upload, e.g. {missing[0]}")
    rundir.write_json(rundir.join(ckpt_url, MARKER), {"files": sorted(files), "time": time.time()})  # retried inside


def local_tempdir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)


def local_files(local_dir: str) -> list[str]:
    """Relative paths ('/'-separated) of the files under a local folder."""
    return sorted(os.path.relpath(os.path.join(root, f), local_dir).replace(os.sep, "/")
                  for root, _, files in os.walk(local_dir) for f in files)


# --------------------------------------------------------------------------- consolidation


def _name_the_accelerator() -> None:
    """Before DeepSpeed's first import: it warns when it has to guess (`linearsr export` on a CPU box)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def _ds_safe_globals() -> list:
    """The plain-data DeepSpeed classes inside ZeRO optimizer files (no code runs to rebuild them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyTorch:
    """`torch` as DeepSpeed's checkpoint readers see it, except that `load` never unpickles code."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, weights_only=None, **_):
        with torch.serialization.safe_globals(_ds_safe_globals()):
            return torch.load(f, map_location=map_location, mmap=bool(mmap), weights_only=True)


@contextlib.contextmanager
def weights_only_loads():
    """While active, DeepSpeed reads checkpoint files with torch.load(weights_only=True): a
    tampered checkpoint in storage cannot run code (its data classes are allow-listed)."""
    _name_the_accelerator()
    from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine
    from deepspeed.utils import zero_to_fp32

    safe = _WeightsOnlyTorch()
    with mock.patch.object(zero_to_fp32, "torch", safe), mock.patch.object(torch_checkpoint_engine, "torch", safe):
        yield


def consolidate(local_dir: str) -> dict[str, torch.Tensor]:
    """One fp32 state dict of the LinearSR weights from a local checkpoint folder of any ZeRO stage
    and world size (DeepSpeed's zero_to_fp32)."""
    _name_the_accelerator()
    from deepspeed.utils import zero_to_fp32

    ds_dir = os.path.join(local_dir, TAG)
    if not os.path.isdir(ds_dir):
        raise FileNotFoundError(f"{local_dir} has no DeepSpeed shards ({TAG}/)")
    with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):  # its prints and progress bar
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(local_dir, tag=TAG)
    prefix = "model."
    return {k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}
