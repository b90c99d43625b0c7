"""Checkpoints: RUN/checkpoints/checkpoint_XXXXXX/ (XXXXXX = optimizer step).

    ds/...                      DeepSpeed shards of every rank (engine.save_checkpoint, tag "ds")
    meta.json                   step, samples, config, val loss, the metrics record of this step
    state_rank<R>.json          rank R's random streams and data position
    ema.safetensors             EMA weights (when optim.ema_decay > 0)
    COMPLETE                    written LAST, by rank 0: every file's size and sha256
    pins/<id>.json              who depends on this checkpoint (never deleted while pinned)
    CORRUPT                     written when a resume found a file that does not match COMPLETE

Each rank saves into a local temp dir, hashes its own files, and hands the dir to
`ray.train.report`, whose upload goes through linearsr.core.storage. Rank 0 then checks that
every file arrived with its size and writes COMPLETE. A folder without COMPLETE is an
interrupted save; one with CORRUPT failed verification: resume, the sidecar, export and `--init`
use neither. Retention (`checkpoint.keep`) keeps the last N, the best validation loss, and every
pinned checkpoint (the ESGF decision, an expert's `--init`, an exported bundle's source); it
removes COMPLETE before the files, so a half-deleted folder is never taken for a good one."""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from linearsr.core import storage

log = logging.getLogger(__name__)

TAG = "ds"
META = "meta.json"
MARKER = "COMPLETE"
CORRUPT = "CORRUPT"
PINS = "pins"
EMA_FILE = "ema.safetensors"
_NAME_RE = re.compile(r"^checkpoint_(\d{6,})$")


def name_of(step: int) -> str:
    return f"checkpoint_{step:06d}"


def url_of(run_url: str, step: int) -> str:
    return storage.join(run_url, "checkpoints", name_of(step))


def state_file(rank: int) -> str:
    return f"state_rank{rank}.json"


def local_tempdir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)


# --------------------------------------------------------------------------- integrity


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_files(local_dir: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under a local folder."""
    return {rel: {"size": size, "sha256": sha256_of(os.path.join(local_dir, rel))}
            for rel, size in storage.find(local_dir).items()}


def write_marker(ckpt_url: str, files: dict[str, dict[str, Any]], step: int | None = None) -> None:
    """Rank 0, after every rank's upload: check that every file is in storage with its size, then
    write COMPLETE with each file's size and checksum. OSError naming a missing or short file."""
    present = storage.find(ckpt_url)
    for rel, info in sorted(files.items()):
        if rel not in present:
            raise OSError(f"checkpoint {ckpt_url} lacks {rel} after the upload (and {sum(r not in present for r in files) - 1} more)")
        if present[rel] != info["size"]:
            raise OSError(f"checkpoint {ckpt_url}: {rel} has {present[rel]} bytes in storage, {info['size']} were saved")
    storage.write_json(storage.join(ckpt_url, MARKER), {"step": step, "files": files, "time": time.time()})


def read_marker(ckpt_url: str) -> dict | None:
    """COMPLETE's content ({"files": {rel: {size, sha256}}}), or None when the save is incomplete."""
    marker = storage.read_json_or_none(storage.join(ckpt_url, MARKER))
    if marker is not None and isinstance(marker.get("files"), list):  # written before checksums existed
        marker["files"] = {rel: {} for rel in marker["files"]}
    return marker


def verify_files(local_dir: str, expected: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with the local copies of `expected`'s files (missing, size, sha256); [] = good."""
    problems = []
    for rel, info in sorted(expected.items()):
        path = os.path.join(local_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{rel} is missing")
            continue
        if "size" in info and os.path.getsize(path) != info["size"]:
            problems.append(f"{rel} has {os.path.getsize(path)} bytes, COMPLETE says {info['size']}")
        elif "sha256" in info and sha256_of(path) != info["sha256"]:
            problems.append(f"{rel} does not match its sha256 in COMPLETE")
    return problems


def mark_corrupt(ckpt_url: str, reason: str) -> None:
    """Record why a checkpoint failed verification; it is never used again (the files stay for a look)."""
    storage.write_json(storage.join(ckpt_url, CORRUPT), {"reason": reason, "time": time.time()})


def fetch(ckpt_url: str, local_dir: str, keep=None) -> tuple[str, list[str]]:
    """The checkpoint's files that `keep(rel)` selects (default: all), as a local folder, verified
    against COMPLETE: (folder, problems). A local checkpoint is verified in place."""
    marker = read_marker(ckpt_url)
    if marker is None:
        return local_dir, [f"{MARKER} is missing"]
    wanted = {rel: info for rel, info in marker["files"].items() if keep is None or keep(rel)}
    if storage.is_local(ckpt_url):
        folder = storage.local_path(ckpt_url)
    else:
        folder = local_dir
        for rel in sorted(wanted):
            storage.get_file(storage.join(ckpt_url, rel), os.path.join(folder, rel))
    return folder, verify_files(folder, wanted)


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Found:
    step: int
    url: str
    complete: bool  # COMPLETE written and not marked CORRUPT


def list_checkpoints(run_url: str) -> list[Found]:
    """Every checkpoint folder under RUN/checkpoints, oldest first, with its completeness."""
    root = storage.join(run_url, "checkpoints")
    try:
        names = storage.ls(root)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _NAME_RE.match(name)
        if m:
            url = storage.join(root, name)
            found.append(Found(int(m.group(1)), url, is_complete(url)))
    return sorted(found, key=lambda f: f.step)


def is_complete(ckpt_url: str) -> bool:
    """COMPLETE exists (every rank's files were stored) and no resume found it corrupt."""
    return storage.exists(storage.join(ckpt_url, MARKER)) and not storage.exists(storage.join(ckpt_url, CORRUPT))


def complete_newest_first(run_url: str, remove_incomplete: bool = False) -> list[Found]:
    """The complete checkpoints, newest first. Incomplete ones newer than the newest complete one
    are logged as skipped (and deleted with `remove_incomplete`, so that step can be saved again)."""
    found = list_checkpoints(run_url)
    newest = max((f.step for f in found if f.complete), default=-1)
    for f in found:
        if not f.complete and f.step > newest and not storage.exists(storage.join(f.url, CORRUPT)):
            log.warning("skipping checkpoint %s: no %s marker, its save was interrupted (a worker died while "
                        "writing); resuming from an earlier one", f.url, MARKER)
            if remove_incomplete:
                storage.rm(f.url, recursive=True)
    return [f for f in reversed(found) if f.complete]


def latest_complete(run_url: str, remove_incomplete: bool = False) -> Found | None:
    complete = complete_newest_first(run_url, remove_incomplete)
    return complete[0] if complete else None


def read_meta(ckpt_url: str) -> dict:
    try:
        return storage.read_json(storage.join(ckpt_url, META))
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_url} is not a LinearSR checkpoint (no {META})") from None


def require_complete(ckpt_url: str) -> None:
    """Raise a one-line error unless ckpt_url is a complete, uncorrupted checkpoint."""
    if not storage.exists(storage.join(ckpt_url, META)):
        raise FileNotFoundError(f"{ckpt_url} is not a checkpoint folder (no {META}); "
                                f"checkpoints are RUN/checkpoints/checkpoint_XXXXXX")
    if not storage.exists(storage.join(ckpt_url, MARKER)):
        raise ValueError(f"checkpoint {ckpt_url} is incomplete (no {MARKER} marker: its save was interrupted); "
                         "choose an earlier one")
    corrupt = storage.read_json_or_none(storage.join(ckpt_url, CORRUPT))
    if corrupt is not None:
        raise ValueError(f"checkpoint {ckpt_url} failed verification ({corrupt.get('reason')}); choose an earlier one")


# --------------------------------------------------------------------------- pins


def _pin_id(by: str) -> str:
    return hashlib.sha1(by.encode()).hexdigest()[:16]


def pin(ckpt_url: str, by: str, why: str) -> None:
    """Record that `by` (a run dir, a bundle, a decision) depends on this checkpoint: retention
    keeps it for good. Idempotent."""
    storage.write_json(storage.join(ckpt_url, PINS, f"{_pin_id(by)}.json"), {"by": by, "why": why, "time": time.time()})


def pins(ckpt_url: str) -> list[dict]:
    try:
        names = storage.ls(storage.join(ckpt_url, PINS))
    except FileNotFoundError:
        return []
    return [p for p in (storage.read_json_or_none(storage.join(ckpt_url, PINS, n)) for n in names) if p]


# --------------------------------------------------------------------------- retention


def to_delete(checkpoints: list[tuple[int, float]], keep: int | None, protected: set[int] = frozenset()) -> list[int]:
    """Steps to delete given (step, val_loss) of the complete checkpoints, oldest first: all but
    the last `keep`, the one with the lowest finite val loss and the `protected` ones.
    keep=None deletes nothing."""
    if keep is None or len(checkpoints) <= keep:
        return []
    finite = [(v, s) for s, v in checkpoints if v is not None and math.isfinite(v)]
    best = min(finite)[1] if finite else None
    recent = {s for s, _ in checkpoints[-keep:]}
    return [s for s, _ in checkpoints if s not in recent and s != best and s not in protected]


def apply_retention(run_url: str, keep: int | None) -> list[int]:
    """Delete what `to_delete` says, pins checked right before: COMPLETE goes first, then the
    files; a pin that appears while COMPLETE is gone puts COMPLETE back and keeps the checkpoint."""
    if keep is None:
        return []
    complete = [f for f in list_checkpoints(run_url) if f.complete]
    protected = {f.step for f in complete if pins(f.url)}
    doomed = to_delete([(f.step, _val_loss(f.url)) for f in complete], keep, protected)
    deleted = []
    for step in doomed:
        url = url_of(run_url, step)
        marker_url = storage.join(url, MARKER)
        marker = storage.read_bytes(marker_url)
        storage.rm(marker_url)
        if pins(url):  # pinned while we looked: keep it
            storage.write_bytes_atomic(marker_url, marker)
            continue
        log.info("retention (checkpoint.keep=%d): deleting %s", keep, url)
        storage.rm(url, recursive=True)
        deleted.append(step)
    return deleted


def _val_loss(ckpt_url: str) -> float | None:
    try:
        v = read_meta(ckpt_url).get("val_loss")
    except FileNotFoundError:
        return None
    return None if v is None else float(v)


# --------------------------------------------------------------------------- random streams


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rank_state(generator: torch.Generator, extra: dict[str, Any]) -> dict[str, Any]:
    """Every random stream of one rank: its t generator, torch's CPU (noise) and CUDA ones,
    Python's (tag dropout) and NumPy's. JSON-serialisable."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"generator": _b64(generator.get_state()), "torch": _b64(torch.get_rng_state()),
             "python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return {**state, **extra}


def restore_rank_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(_unb64(state["generator"]))
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))
