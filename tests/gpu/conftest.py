"""tests/gpu runs only where CUDA exists (the GPU machine: `make gpu-check`, see docs/gpu.md);
everywhere else every test in this folder is reported as skipped, never failed."""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a GPU); run `make gpu-check` on the GPU machine, see docs/gpu.md")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)
