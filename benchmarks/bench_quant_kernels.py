"""Speed of the weight-only quantized linear candidates vs bf16 `F.linear` on Ouro-1.4B shapes.

Every candidate runs side by side in one process (interleaved, median of repeats), so the
ratios hold even when other jobs share the cores.

    nice -n 5 python benchmarks/bench_quant_kernels.py [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from looplm.quant.kernels import dequantize_int4, dequantize_int8, pack_int4_for_cpu, quantize_int4, quantize_int8

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]  # (out, in): q/k/v/o, gate/up, down


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def candidates(weight: torch.Tensor, x: torch.Tensor, group: int) -> dict[str, Callable[[], object]]:
    dtype = x.dtype
    w = weight.to(dtype)
    q8, s8 = quantize_int8(weight)
    s8 = s8.to(dtype)
    q4, scales, zeros = quantize_int4(weight, group)
    packed, sz = pack_int4_for_cpu(q4, scales, zeros, dtype)
    return {
        "bf16 F.linear": lambda: F.linear(x, w),
        "int8 _weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
        "int8 dequant + F.linear": lambda: F.linear(x, dequantize_int8(q8, s8, dtype)),
        "int8 F.linear(x, q.to) * s": lambda: F.linear(x, q8.to(dtype)) * s8,
        f"int4 _weight_int4pack_mm_for_cpu g{group}": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, group, sz
        ),
        f"int4 dequant + F.linear g{group}": lambda: F.linear(x, dequantize_int4(q4, scales, zeros, group, dtype)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations {args.dtype}, "
          f"median of {args.repeats}")
    print(f"| M | shape (out x in) | kernel | ms | speed-up vs {args.dtype} |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in args.rows:
            for out_f, in_f in SHAPES:
                weight = torch.randn(out_f, in_f) * 0.02
                x = torch.randn(rows, in_f, dtype=dtype)
                fns = candidates(weight, x, args.group_size)
                reps = max(5, args.repeats // (4 if rows > 64 else 1))
                samples: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(3):  # interleave the candidates so background load hits all alike
                    for name, fn in fns.items():
                        samples[name].append(median_ms(fn, reps))
                base = statistics.median(samples[next(iter(fns))])
                for name in fns:
                    ms = statistics.median(samples[name])
                    print(f"| {rows} | {out_f}x{in_f} | {name} | {ms:.3f} | {base / ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
