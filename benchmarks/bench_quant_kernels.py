"""Speed of the weight-only quantized linear candidates vs bf16 `F.linear` on Ouro-1.4B shapes.

Every candidate runs side by side in one process (interleaved, median of repeats), so the
ratios hold even when other jobs share the cores.

    nice -n 5 python benchmarks/bench_quant_kernels.py [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from looplm.quant.kernels import dequantize_int4, pack_int4_for_cpu, quantize_int4, quantize_int8

SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]  # (out, in): q/k/v/o, gate/up, down


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def candidates(weight: torch.Tensor, x: torch.Tensor, group: int, copies: int) -> dict[str, Callable[[], object]]:
    """One closure per kernel; each call uses the next of `copies` weight copies, so the weights
    come from memory as in a model, not from a cache that one matrix would fit in."""
    dtype = x.dtype
    made = []
    for i in range(copies):
        w = weight.roll(i, dims=0)
        q8, s8 = quantize_int8(w)
        q4, scales, zeros = quantize_int4(w, group)
        packed, sz = pack_int4_for_cpu(q4, scales, zeros, dtype)
        made.append((w.to(dtype), q8, s8.to(dtype), q4, scales, zeros, packed, sz))
    turn = itertools.cycle(range(copies))

    def each(fn: Callable[..., object]) -> Callable[[], object]:
        return lambda: fn(*made[next(turn)])

    return {
        "bf16 F.linear": each(lambda w, *_: F.linear(x, w)),
        "int8 _weight_int8pack_mm": each(lambda w, q8, s8, *_: torch.ops.aten._weight_int8pack_mm(x, q8, s8)),
        "int8 cast + F.linear, scale on output": each(lambda w, q8, s8, *_: F.linear(x, q8.to(dtype)) * s8),
        f"int4 _weight_int4pack_mm_for_cpu g{group}": each(
            lambda *m: torch.ops.aten._weight_int4pack_mm_for_cpu(x, m[6], group, m[7])
        ),
        f"int4 dequantize + F.linear g{group}": each(
            lambda w, q8, s8, q4, sc, zr, *_: F.linear(x, dequantize_int4(q4, sc, zr, group, dtype))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--copies", type=int, default=6, help="weight copies cycled through (beat the L3 cache)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations {args.dtype}, "
          f"median of {args.repeats}, M=1 cycles through {args.copies} weight copies")
    print(f"| M | shape (out x in) | kernel | ms | speed-up vs {args.dtype} |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in args.rows:
            for out_f, in_f in SHAPES:
                weight = torch.randn(out_f, in_f) * 0.02
                x = torch.randn(rows, in_f, dtype=dtype)
                fns = candidates(weight, x, args.group_size, args.copies if rows == 1 else 1)
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
