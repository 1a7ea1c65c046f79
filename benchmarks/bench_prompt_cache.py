"""A multi-turn conversation with and without a `PromptCache`: prompt-pass time per turn.

Each turn's prompt is the whole conversation so far (the previous prompt, the reply, a new user
message), as a chat sends it. Without the cache every turn prefills all of it; with it, only what
the previous turn did not already hold. Both modes run in each round, alternately, on the same
model and token ids; the table gives the median [min-max] over rounds, and the ratio per round.

    python benchmarks/bench_prompt_cache.py --model ~/.cache/looplm/bench/ouro-1.4b-random-bf16-v1-seed0
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import looplm
from looplm.prompt_cache import PromptCache


def conversation(model, first: int, later: int, turns: int, new_tokens: int, cache: PromptCache | None,  # noqa: ANN001
                 seed: int) -> list[tuple[int, float]]:
    """(prompt tokens, prompt-pass seconds) of each turn."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (first,), generator=gen).tolist()
    rows = []
    for _ in range(turns):
        ids, stats = model.generate(prompt, new_tokens, eos_token_ids=[], prompt_cache=cache, return_stats=True)
        rows.append((len(prompt), stats.prefill_s))
        prompt = prompt + ids[0] + torch.randint(3, vocab, (later,), generator=gen).tolist()  # the next message
    return rows


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--first", type=int, default=200, help="tokens of the first message")
    parser.add_argument("--later", type=int, default=20, help="tokens of each later message")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    model = looplm.load(args.model, dtype=args.dtype)
    fresh: list[list[tuple[int, float]]] = []
    cached: list[list[tuple[int, float]]] = []
    for round_ in range(args.rounds):
        for mode in ("fresh", "cached") if round_ % 2 == 0 else ("cached", "fresh"):
            cache = PromptCache() if mode == "cached" else None
            rows = conversation(model, args.first, args.later, args.turns, args.new_tokens, cache, seed=round_)
            (cached if mode == "cached" else fresh).append(rows)
            print(f"round {round_ + 1}/{args.rounds} {mode}: " + ", ".join(f"{s:.2f} s" for _, s in rows),
                  file=sys.stderr)
    print(f"{model.source}, {args.dtype}, {torch.get_num_threads()} threads; {args.turns} turns, first message "
          f"{args.first} tokens, then {args.later} per message, {args.new_tokens} new tokens per reply; "
          f"{args.rounds} rounds")
    print("| turn | prompt tokens | prompt pass, fresh (s) | prompt pass, PromptCache (s) | fresh / cached |")
    print("|---|---|---|---|---|")
    for turn in range(args.turns):
        a = [rows[turn][1] for rows in fresh]
        b = [rows[turn][1] for rows in cached]
        print(f"| {turn + 1} | {fresh[0][turn][0]} | {spread(a)} | {spread(b)} | "
              f"{spread([x / y for x, y in zip(a, b)])}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
