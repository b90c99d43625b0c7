"""Small helpers several stages share: one definition each."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

# the image files LinearSR reads (shard building, evaluation folders, upscale inputs)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def stable_hash(*parts) -> int:
    """A 64-bit hash that is the same in every process and Python version (unlike hash())."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def normalize_tags(tags: Iterable[str] | str, max_tags: int | None = None) -> list[str]:
    """Lower-case, collapse whitespace, drop empties and duplicates (keeping order), cap at
    max_tags (None: no cap). A string is split on commas: "Cat, grass ,cat" -> ["cat", "grass"]."""
    if isinstance(tags, str):
        tags = tags.split(",")
    out: list[str] = []
    for tag in tags:
        tag = " ".join(str(tag).lower().split())
        if tag and tag not in out:
            out.append(tag)
    return out if max_tags is None else out[:max_tags]


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with that id is running (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:  # a zombie child (exited, not yet reaped) still answers kill 0
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return True
