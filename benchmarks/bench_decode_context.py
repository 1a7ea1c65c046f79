"""Paired batch-1 decode of bf16 / int8 / int4 models at a long context, in minutes.

`looplm bench` measures the issue's table end to end (a real 512-token prefill per row and
repeat, the no-cache and torch rows), which takes 45 minutes on an AVX2-only 2-core CPU. To
compare kernel changes quickly, this script skips the prefill: each model's KV cache is
filled with random K/V up to `--context` tokens, then every model decodes `--tokens` tokens
per round (all UT steps, full cache, the same code as `generate`), the models taking turns
within each round so they share the machine's state. Reported per model: ms per token
(median and range over rounds) and the speed-up over the first model, paired within rounds.

    python benchmarks/bench_decode_context.py --threads 2                 # Ouro-1.4B shape
    python benchmarks/bench_decode_context.py --model DIR --rows bf16,int4 --context 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import looplm
from looplm.bench import bench_home, ensure_checkpoint
from looplm.exit import LastPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint (default: the random 1.4B one `looplm bench` writes)")
    parser.add_argument("--rows", default="bf16,int8,int4", help="comma-separated: bf16, int8, int4 (the first is the reference)")
    parser.add_argument("--context", type=int, default=512, help="cached tokens before the first decoded one")
    parser.add_argument("--tokens", type=int, default=6, help="tokens per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows.split(",")
    path = args.model or ensure_checkpoint("1.4b", bench_home())[0]
    models = {row: looplm.load(path, quant=None if row == "bf16" else row, group_size=args.group_size) for row in rows}
    caches = {}
    for row, model in models.items():
        cache = model.make_cache(1, args.context + args.tokens * (args.rounds + 1))
        cache.keys.normal_()
        cache.values.normal_()
        cache.length = args.context
        caches[row] = cache
    token, policy = torch.tensor([[5]]), LastPolicy()
    steps = next(iter(models.values())).config.total_ut_steps
    times: dict[str, list[float]] = {row: [] for row in rows}
    with torch.inference_mode():
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for row in rows:
                model, cache = models[row], caches[row]
                start = time.perf_counter()
                for _ in range(args.tokens):
                    model.decode_step(token, torch.tensor([[cache.length]]), None, cache, steps, policy)
                if round_index:
                    times[row].append((time.perf_counter() - start) / args.tokens * 1e3)
    print(f"{path.name}: context {args.context}, {args.tokens} tokens x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, kernels {next(iter(models.values())).kernels}")
    print(f"| weights | ms / token | speed-up vs {rows[0]} (paired) |")
    print("|---|---|---|")
    for row in rows:
        ms = times[row]
        paired = [first / mine for first, mine in zip(times[rows[0]], ms, strict=True)]
        print(f"| {row} | {statistics.median(ms):.1f} [{min(ms):.1f}-{max(ms):.1f}] | "
              f"{statistics.median(paired):.2f}x [{min(paired):.2f}-{max(paired):.2f}] |")


if __name__ == "__main__":
    main()
