"""Batched bf16 decode on CPUs with AVX-512 BF16: looplm's skinny kernel, one weight row per pass
against the automatic choice (several weight rows per pass from 4 activation rows on).

One process, the Ouro-1.4B shape (random weights, the checkpoint `looplm bench` writes; `--model`
for another), a batch of random 32-token prompts per batch size; the settings take turns within
each round (greedy tokens, eos off) and each round gives a paired speed-up, so the machine's
drift cancels out.

    python benchmarks/bench_batch_decode.py                      # batches 1-8, settings 1 vs 0 (auto)
    python benchmarks/bench_batch_decode.py --batches 4,8 --settings 1,2,3,4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import looplm
from looplm.bench import bench_home, ensure_checkpoint
from looplm.generate import stream_generate
from looplm.kernels.extension import extension_or_reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint (default: the random 1.4B one `looplm bench` writes)")
    parser.add_argument("--batches", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--settings", default="1,0", help="weight rows per pass (0: automatic); the first is the reference")
    parser.add_argument("--tokens", type=int, default=6, help="decode steps timed per setting and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    kernels, path_or_reason = extension_or_reason()
    if kernels is None or path_or_reason != "avx512bf16":
        raise SystemExit(f"needs looplm's kernels on a CPU with AVX-512 BF16 (here: {path_or_reason})")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [int(value) for value in args.settings.split(",")]
    path = args.model or ensure_checkpoint("1.4b", bench_home())[0]
    model = looplm.load(path, dtype="bfloat16")
    print(f"{model.config.num_hidden_layers} layers x hidden {model.config.hidden_size}, bf16, "
          f"{torch.get_num_threads()} threads, prompt 32, {args.tokens} decode steps x {args.rounds} rounds; "
          "ms per step median [min-max], speed-up paired within a round")
    print("| batch | " + " | ".join(f"setting {s}: ms / step | x setting {settings[0]}" for s in settings) + " |")
    print("|---|" + "---|---|" * len(settings))
    try:
        for batch in (int(value) for value in args.batches.split(",")):
            prompts = torch.randint(0, model.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
            times: dict[int, list[float]] = {setting: [] for setting in settings}
            with torch.inference_mode():
                for round_index in range(args.rounds + 1):  # round 0 warms up
                    for setting in settings:
                        kernels.set_weight_rows_per_pass(setting)
                        marks = [time.perf_counter() for _ in stream_generate(model, prompts, args.tokens + 1,
                                                                                 eos_token_ids=[])]
                        if round_index:
                            times[setting].append((marks[-1] - marks[0]) / args.tokens * 1e3)
            cells = []
            for setting in settings:
                paired = [first / mine for first, mine in zip(times[settings[0]], times[setting], strict=True)]
                ms = times[setting]
                cells.append(f"{statistics.median(ms):.0f} [{min(ms):.0f}-{max(ms):.0f}] | "
                             f"{statistics.median(paired):.2f}x [{min(paired):.2f}-{max(paired):.2f}]")
            print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)
    finally:
        kernels.set_weight_rows_per_pass(0)


if __name__ == "__main__":
    main()
