#!/usr/bin/env bash
# The GPU checks in one run, from the repository root on a CUDA machine whose python3 has torch:
# the CUDA tests, then `looplm bench --device cuda` in graph mode (every row), then compiled +
# graphed decode, one dtype per process so that a slow compile loses only its own rows.
# Writes everything under $OUT (default ./gpu-out). LOOPLM_FIXTURES: the folder holding
# ouro-tiny/ when ../shared is not beside the checkout. On an H200 (2026-12-04) the steps took
# 41 s, 46 s, 25 s and 33 s: about 3 minutes with start-up; the timeouts allow 8.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"

# The report goes to the terminal; the JSON document (bench_cuda's last stdout line) to a file only.
bench() {  # bench NAME TIMEOUT ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== bench $name: $*"
    timeout "$limit" python3 -m looplm.bench_cuda --json-out "$out/$name.json" "$@" 2>"$out/$name.log" | grep -v '^{'
    echo "== bench $name exit ${PIPESTATUS[0]}"
}

echo "== tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt" | tail -25

bench graph 120 --mode graph
bench compiled-bf16 110 --mode compile+graph --dtypes bf16 --profile-steps 8
bench compiled-int4 110 --mode compile+graph --dtypes int4 --profile-steps 8
