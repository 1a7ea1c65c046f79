"""`looplm batch` throughput: one request at a time against continuous batching, same requests.

Writes a batch of chat requests (distinct questions, a fixed number of new tokens each:
`ignore_eos`, so both runs do the same work), then runs it with `--max-batch 1` (each request
alone, what a loop over `looplm generate` or a one-at-a-time client gets, minus the process
start) and with `--max-batch N`. Rounds alternate which goes first; median [min-max] of the
completion tokens per second over the whole batch, and the speed-up of each round.

    python benchmarks/bench_batch_file.py --model ~/.cache/looplm/assets/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import looplm
from looplm.server.offline import plan_batch, run_batch


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = looplm.load(args.model, dtype=args.dtype)
    work = Path(tempfile.mkdtemp(prefix="looplm-bench-batch-"))
    source = work / "requests.jsonl"
    with source.open("w") as f:
        for i in range(args.requests):
            body = {"messages": [{"role": "user", "content": f"Question {i}: what is {i} times {i + 3}? Explain."}],
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"q{i}", **body}) + "\n")
    rates: dict[int, list[float]] = {1: [], args.max_batch: []}
    ratios = []
    for round_ in range(args.rounds):
        order = [1, args.max_batch] if round_ % 2 == 0 else [args.max_batch, 1]
        for width in order:
            out = work / f"out-{round_}-{width}.jsonl"
            summary = run_batch(model, plan_batch(source, out), "bench", max_batch=width)
            assert summary.failed == 0 and summary.succeeded == args.requests, summary
            rates[width].append(summary.completion_tokens / summary.seconds)
            print(f"round {round_ + 1} max_batch {width}: {summary.completion_tokens} tokens in "
                  f"{summary.seconds:.2f} s", file=sys.stderr)
        ratios.append(rates[args.max_batch][-1] / rates[1][-1])
    print(f"model {args.model or 'embedded'} ({args.dtype}), {args.requests} requests x {args.max_tokens} tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| max_batch | completion tok/s, median [min-max] |")
    print("|---|---|")
    for width, values in rates.items():
        print(f"| {width} | {spread(values)} |")
    print(f"speed-up, max_batch {args.max_batch} over 1: {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}-{max(ratios):.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
