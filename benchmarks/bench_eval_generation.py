"""Generation tasks of `looplm eval`: static batches against the serving engine's continuous batching.

Both run the same jobs (GSM8K prompts, greedy, the dynamic decode step, `--batch-size` rows):
static batches through `looplm.generate` (a batch runs until its longest answer ends) and the
engine (a finished row is replaced at once), which `looplm eval` uses since session 14. Rounds
alternate which goes first; seconds median [min-max], the speed-up, and how many answers agree.

    python benchmarks/bench_eval_generation.py --model ~/.cache/looplm/assets/smollm2-gguf/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import looplm
from looplm.eval.harness import EvalSettings, _answers_continuously, _answers_in_static_batches, _render, plan


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-fewshot", type=int, default=0)
    args = parser.parse_args(argv)
    model = looplm.load(args.model, dtype=args.dtype)
    settings = EvalSettings(task="gsm8k", steps=[model.config.total_ut_steps], limit=args.limit,
                            batch_size=args.batch_size, decoder="dynamic", num_fewshot=args.num_fewshot)
    task, items = plan(settings)
    config = settings.configs()[0]
    jobs = [(config, item) for item in items]
    prompts = [model.tokenizer.encode(_render(model.tokenizer, item, None)) for item in items]
    runs = {"static": _answers_in_static_batches, "continuous": _answers_continuously}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    answers: dict[str, dict[int, list[int]]] = {}
    for round_ in range(args.rounds):
        for name in list(runs)[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            answers[name] = {index: tokens for index, tokens, _ in runs[name](model, jobs, prompts,
                                                                               args.max_new_tokens, settings)}
            seconds[name].append(time.perf_counter() - start)
            print(f"round {round_ + 1} {name}: {seconds[name][-1]:.1f} s", file=sys.stderr)
    lengths = sorted(len(tokens) for tokens in answers["static"].values())
    same = sum(answers["static"][i] == answers["continuous"][i] for i in range(len(jobs)))
    print(f"model {args.model or 'embedded'} ({args.dtype}), GSM8K {args.num_fewshot}-shot x {len(jobs)} "
          f"(prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens), batch {args.batch_size}, "
          f"max {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads, {args.rounds} rounds; "
          f"answer lengths {lengths[0]}-{lengths[-1]} (median {statistics.median(lengths):.0f})")
    print("| batching | seconds, median [min-max] |")
    print("|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}] |")
    ratios = [s / c for s, c in zip(seconds["static"], seconds["continuous"])]
    print(f"speed-up: {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]; "
          f"identical answers: {same}/{len(jobs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
