"""Speed of the weight-only quantized linear candidates vs bf16 on Ouro-1.4B shapes.

Every candidate runs side by side in one process (interleaved, median of repeats), so the
ratios hold even when other jobs share the cores. The baseline (first row, 1.00x) is what a
bf16 model runs: looplm's bf16 GEMV for up to 8 rows (when the C++ kernels load), else
`F.linear`. looplm's candidates: its bf16 GEMV, the old int8 kernel (weights widened to fp32),
the integer dot-product kernels (int8 and int4, activations quantized per block of 32) for up
to 8 rows, and int4 dequantize-in-C++ + `F.linear` for more.

    nice -n 5 python benchmarks/bench_quant_kernels.py [--repeats 30] [--threads N] [--only looplm]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from looplm.kernels.extension import extension_or_reason
from looplm.quant.kernels import dequantize_int4, pack_int4_for_cpu, pack_int4_looplm, quantize_int4, quantize_int8

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
        ours = pack_int4_looplm(q4, scales, zeros, group)
        made.append((w.to(dtype), q8, s8.to(dtype), q4, scales, zeros, packed, sz, s8, ours))
    turn = itertools.cycle(range(copies))

    def each(fn: Callable[..., object]) -> Callable[[], object]:
        return lambda: fn(*made[next(turn)])

    kernels, _ = extension_or_reason()
    rows, k = x.shape
    looplm_rows: dict[str, Callable[[], object]] = {}
    if kernels is not None and dtype == torch.bfloat16 and rows <= 8:
        looplm_rows = {
            "bf16 looplm GEMV": each(lambda w, *_: kernels.skinny_linear_bf16(x, w)),
            "int8 looplm dot kernel": each(lambda w, q8, *m: kernels.int8_dot_linear(x, q8, m[6])),
            f"int4 looplm dot kernel g{group}": each(lambda *m: kernels.int4_dot_linear(x, *m[9], group, weight.shape[0])),
        }
    elif kernels is not None and dtype == torch.bfloat16:
        looplm_rows = {
            f"int4 looplm dequantize + F.linear g{group}": each(
                lambda *m: F.linear(x, kernels.int4_dequantize(*m[9], group, k, weight.shape[0]))
            ),
        }
    return {
        **({"bf16 looplm GEMV": looplm_rows.pop("bf16 looplm GEMV")} if "bf16 looplm GEMV" in looplm_rows else {}),
        "bf16 F.linear": each(lambda w, *_: F.linear(x, w)),
        "int8 _weight_int8pack_mm": each(lambda w, q8, s8, *_: torch.ops.aten._weight_int8pack_mm(x, q8, s8)),
        "int8 cast + F.linear, scale on output": each(lambda w, q8, s8, *_: F.linear(x, q8.to(dtype)) * s8),
        f"int4 _weight_int4pack_mm_for_cpu g{group}": each(
            lambda *m: torch.ops.aten._weight_int4pack_mm_for_cpu(x, m[6], group, m[7])
        ),
        f"int4 dequantize + F.linear g{group}": each(
            lambda w, q8, s8, q4, sc, zr, *_: F.linear(x, dequantize_int4(q4, sc, zr, group, dtype))
        ),
        **looplm_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--copies", type=int, default=6, help="weight copies cycled through (beat the L3 cache)")
    parser.add_argument("--only", nargs="*", default=[], help="keep candidates whose name contains one of these "
                        "(the baseline always runs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations {args.dtype}, "
          f"median of {args.repeats}, M=1 cycles through {args.copies} weight copies")
    print("| M | shape (out x in) | kernel | ms | speed-up vs the first row |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in args.rows:
            for out_f, in_f in SHAPES:
                weight = torch.randn(out_f, in_f) * 0.02
                x = torch.randn(rows, in_f, dtype=dtype)
                fns = candidates(weight, x, args.group_size, args.copies if rows <= 8 else 1)
                base_name = next(iter(fns))
                fns = {name: fn for name, fn in fns.items()
                       if name == base_name or not args.only or any(word in name for word in args.only)}
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
