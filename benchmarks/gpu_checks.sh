#!/usr/bin/env bash
# The GPU checks, from the repository root on a CUDA machine whose python3 has torch. Stages:
#   tests     the CUDA tests (tests/test_cuda.py)
#   graph     `looplm bench --device cuda` in graph mode (every row), then the dynamic decode step
#             (what `generate` runs without `decoder=`) for bf16
#   compiled  compiled + graphed decode, one dtype per process (a slow compile loses only its rows),
#             with an 8-step profile
#   cdt       compiled bf16 with Inductor's coordinate descent tuning (on CUDA it turns one-row
#             matmuls into reductions fused with the norms around them): alone, with matmul
#             attention, with fused q|k|v and gate|up (batch 1 and 8, no profile)
#   ab        the static step's other A/B options against the compiled bf16 run: FlexAttention,
#             matmul attention, fused q|k|v and gate|up projections, flex + fused
#   autotune  (only when named) fused + matmul compiled with Inductor's max-autotune GEMM search
# Compare the ab runs afterwards, anywhere: python -m looplm.bench_cuda --compare \
#   gpu-out/compiled-bf16.json gpu-out/{cdt,cdt-matmul,cdt-fused,flex,matmul,fused,flex-fused}-bf16.json
# `bash benchmarks/gpu_checks.sh` runs every stage; `bash benchmarks/gpu_checks.sh tests ab` only
# those (a device call is limited to 10 minutes: run `tests compiled cdt` first, the wiring and
# the baseline and the most promising option, then `ab graph`).
# Writes everything under $OUT (default ./gpu-out). LOOPLM_FIXTURES: the folder holding
# ouro-tiny/ when ../shared is not beside the checkout. On an H200 (2026-12-04) tests, graph and
# the two compiled runs took 41 s, 46 s, 25 s and 33 s (about 3 minutes with start-up); the ab
# stage and the tests added since have not run on a GPU yet (coordinate descent tunes each Triton
# kernel at compile time: its runs get the longest timeouts).
set -uo pipefail
out=${OUT:-gpu-out}
stages=${*:-tests graph compiled cdt ab}
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

for stage in $stages; do
    case $stage in
        tests)
            echo "== tests"
            timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt" | tail -25 ;;
        graph)
            bench graph 120 --mode graph
            bench dynamic 90 --mode dynamic --dtypes bf16 ;;
        compiled)
            bench compiled-bf16 110 --mode compile+graph --dtypes bf16 --profile-steps 8
            bench compiled-int4 110 --mode compile+graph --dtypes int4 --profile-steps 8 ;;
        cdt)
            bench cdt-bf16 120 --mode compile+graph --dtypes bf16 --inductor-option coordinate_descent_tuning=true
            bench cdt-matmul-bf16 120 --mode compile+graph --dtypes bf16 --attention matmul \
                --inductor-option coordinate_descent_tuning=true
            bench cdt-fused-bf16 120 --mode compile+graph --dtypes bf16 --fuse-projections \
                --inductor-option coordinate_descent_tuning=true ;;
        ab)
            bench flex-bf16 90 --mode compile+graph --dtypes bf16 --attention flex
            bench matmul-bf16 90 --mode compile+graph --dtypes bf16 --attention matmul
            bench fused-bf16 90 --mode compile+graph --dtypes bf16 --fuse-projections
            bench flex-fused-bf16 90 --mode compile+graph --dtypes bf16 --attention flex --fuse-projections ;;
        autotune)  # not in the default stages: Inductor's GEMM search takes minutes
            bench autotune-bf16 300 --mode compile+graph --dtypes bf16 --batch-sizes 1 --fuse-projections \
                --attention matmul --compile-mode max-autotune-no-cudagraphs ;;
        *)
            echo "unknown stage '$stage' (choose from tests graph compiled cdt ab autotune)" >&2
            exit 2 ;;
    esac
done
