"""Which LinearSR code is running: the package's files, laid out as they import, and a short
content digest of them (`linearsr --version`, the trainer's log and TensorBoard, checkpoints'
meta.json, `linearsr submit`).

The same files hash the same wherever they sit: an editable checkout (cli/, model/, data/, ...
mapped by pyproject's package-dir), an installed package, or the copy a Ray job received
(cluster/jobs.py ships exactly `package_files()`), so the digest a job reports can be matched
with the one its submitter printed."""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sys

from linearsr.core.layers import SHIPPED

PACKAGE = "linearsr"
# The shipped subpackages, each a folder of its own in a checkout (core, model, ... ; commands
# inside cli/); nested ones (model.kernels) are inside their parent's folder. linearsr.dev and
# linearsr.bench are not shipped.
SUBPACKAGES = SHIPPED
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".so")


def package_files() -> list[tuple[str, str]]:
    """[(path relative to the package, e.g. 'model/network.py', absolute source path)], sorted."""
    top = list(sys.modules[PACKAGE].__path__)[0]  # imported already: this module is inside it
    out = [(name, os.path.join(top, name)) for name in os.listdir(top)  # the top package's own modules
           if os.path.isfile(os.path.join(top, name)) and not name.endswith(_SKIP_SUFFIXES)]
    for sub in SUBPACKAGES:
        src = list(importlib.import_module(f"{PACKAGE}.{sub}").__path__)[0]
        for folder, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
            rel = os.path.relpath(folder, src)
            for name in files:
                if not name.endswith(_SKIP_SUFFIXES):
                    out.append((os.path.normpath(os.path.join(sub, rel, name)), os.path.join(folder, name)))
    return sorted(out)


@functools.lru_cache(maxsize=1)
def code_id() -> str:
    """12 hex digits of sha256 over every package file's relative path and bytes."""
    h = hashlib.sha256()
    for rel, path in package_files():
        with open(path, "rb") as f:
            h.update(rel.replace(os.sep, "/").encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:12]
