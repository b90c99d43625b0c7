"""Real photos and metric weights that `make data` / `make weights` put under runs/: a test that
needs one skips without it (so `make test-unit` runs offline), except under `make test`, which
builds them first and sets LINEARSR_REQUIRE_ASSETS=1 so a missing one fails instead of hiding."""

import os

import pytest


def require(path: str, target: str) -> str:
    """`path` if it exists; otherwise skip (or fail under make test) naming `make TARGET`."""
    if os.path.exists(path):
        return path
    message = f"{path} is missing: `make {target}` writes it"
    if os.environ.get("LINEARSR_REQUIRE_ASSETS") == "1":
        pytest.fail(message)
    pytest.skip(message)
