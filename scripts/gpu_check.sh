#!/usr/bin/env bash
# Every GPU check of the project in one go, for the lent GPU machine (H100/H200), see docs/gpu.md.
#
# That machine has Python 3.12 with torch 2.11 and triton 3.6 preinstalled and no network, so this
# script installs nothing from the internet and never touches torch:
#   1. flash-linear-attention (fla-core) from the wheels in .cache/wheels (made here by `make gpu-wheels`
#      and carried along), into /tmp/site;
#   2. linearsr made importable through a symlink tree in /tmp (the setuptools package-dir mapping
#      linearsr.model -> model/ ...), without its cluster dependencies (ray, deepspeed, s3fs);
#   3. tests/gpu (pytest) and the benchmark, each under its own time limit.
# Results go to $OUT (the device tool's result folder) or runs/bench/: env.txt, test_gpu.log,
# bench_gpu.log, gpu.json. Exit status: non-zero if the tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-runs/bench}
PY=${GPU_PY:-python3}
TEST_LIMIT=${GPU_TEST_LIMIT_S:-240}
BENCH_LIMIT=${GPU_BENCH_LIMIT_S:-300}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

if compgen -G ".cache/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .cache/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu_check: no .cache/wheels/*.whl (run 'make gpu-wheels' here and carry .cache/wheels): fla rows will be skipped"
fi

SRC=/tmp/linearsr_src
rm -rf "$SRC" && mkdir -p "$SRC/linearsr"
ln -s "$PWD"/cli/*.py "$SRC/linearsr/"
for pkg in model data trainer cluster ckpt_analysis; do ln -s "$PWD/$pkg" "$SRC/linearsr/$pkg"; done
export PYTHONPATH=$SRC:$PYTHONPATH

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    "$PY" -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
    date -u +%FT%TZ
} | tee "$RESULTS/env.txt"

timeout "$TEST_LIMIT" "$PY" -m pytest tests/gpu -q -rs 2>&1 | tee "$RESULTS/test_gpu.log"
tests=${PIPESTATUS[0]}
timeout "$BENCH_LIMIT" "$PY" -m linearsr bench gpu --out "$RESULTS/gpu.json" 2>&1 | tee "$RESULTS/bench_gpu.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, bench exit $bench (124 = hit its time limit); results in $RESULTS"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
