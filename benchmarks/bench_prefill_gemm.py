"""Prefill GEMM routes for bf16 weights, side by side, on Ouro-1.4B layer shapes.

Rows: torch's bf16 `F.linear` (what the reference runs), the old fp32 route (fresh fp32
copies of x and W, `F.linear`), the upcast into a reused buffer with `F.linear`, and
looplm's route (`looplm.kernels.fp32_gemm.upcast_linear`: reused buffer + oneDNN fp32).
Each route runs in turn within every round (interleaved), so the ratios hold on a shared
machine; the table shows the median and [min-max] GFLOP/s over the rounds.

    python benchmarks/bench_prefill_gemm.py [--rows 512] [--rounds 5] [--threads 2] [--emulate-avx2]

--emulate-avx2 re-runs itself with oneDNN and ATen limited to AVX2, as on an AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from looplm.kernels.fp32_gemm import fp32_weight_buffer, upcast_linear

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]  # (out, in): q/o, gate/up, down
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def buffered_mkl(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    w32 = fp32_weight_buffer(w.shape)
    w32.copy_(w)
    return F.linear(x.float(), w32).to(x.dtype)


ROUTES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bf16 F.linear (reference)": F.linear,
    "fp32, fresh copies, F.linear": lambda x, w: F.linear(x.float(), w.float()).to(x.dtype),
    "fp32, reused buffer, F.linear": buffered_mkl,
    "fp32, reused buffer, oneDNN (looplm)": upcast_linear,
}


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--emulate-avx2", action="store_true")
    args = parser.parse_args()
    if args.emulate_avx2 and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        argv = [sys.executable, *sys.argv]
        return subprocess.call(argv, env={**os.environ, **AVX2_ENV})
    torch.set_num_threads(args.threads)
    isa = "AVX2 (emulated)" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else torch.backends.cpu.get_cpu_capability()
    print(f"M = {args.rows}, {args.threads} threads, ISA {isa}, torch {torch.__version__}; GFLOP/s, median [min-max] "
          f"of {args.rounds} interleaved rounds")
    for out_features, in_features in SHAPES:
        x = torch.randn(args.rows, in_features).bfloat16()
        w = torch.randn(out_features, in_features).bfloat16()
        flops = 2 * args.rows * out_features * in_features
        for fn in ROUTES.values():
            fn(x, w)  # warm up (and size the reused buffer)
        speeds: dict[str, list[float]] = {name: [] for name in ROUTES}
        for _ in range(args.rounds):
            for name, fn in ROUTES.items():
                speeds[name].append(flops / seconds(lambda fn=fn, x=x, w=w: fn(x, w)) / 1e9)
        reference = statistics.median(speeds["bf16 F.linear (reference)"])
        print(f"\n{out_features}x{in_features}")
        for name, values in speeds.items():
            median = statistics.median(values)
            print(f"  {name:38s} {median:7.1f} [{min(values):.1f}-{max(values):.1f}]  {median / reference:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
