"""The server engine's prefix store on a chat's second turn: time to the first token with and without.

Turn 1 sends a prompt and gets a reply; turn 2 sends turn 1's prompt, the reply and a new message,
as chat clients do. With the store (`looplm serve --prefix-cache-mb`, on by default) turn 2
prefills only what turn 1 did not leave; without it, all of it. Each round runs both engines on
the same token ids, alternating which goes first; median [min-max] over rounds.

    python benchmarks/bench_server_prefix.py --model ~/.cache/looplm/bench/ouro-1.4b-random-bf16-v1-seed0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

import looplm
from looplm.sampling import SamplingParams
from looplm.server.engine import Engine, Sequence


def first_token_seconds(engine: Engine, prompt: list[int], budget: int) -> tuple[float, list[int]]:
    """Seconds from submitting to the first token, and the tokens (waits for the end)."""
    tokens: list[int] = []
    first, done = threading.Event(), threading.Event()

    def on_event(event) -> None:  # noqa: ANN001
        if event.kind == "token":
            tokens.append(event.token)
            first.set()
        elif event.kind != "prompt":
            done.set()

    start = time.perf_counter()
    engine.submit(Sequence(prompt, budget, engine.loop_config(), SamplingParams(), None, frozenset(), on_event))
    first.wait()
    elapsed = time.perf_counter() - start
    done.wait()
    return elapsed, tokens


def conversation(engine: Engine, first: list[int], message: list[int], budget: int) -> tuple[float, float]:
    """Time to the first token of turn 1 and of turn 2."""
    t1, reply = first_token_seconds(engine, first, budget)
    t2, _ = first_token_seconds(engine, first + reply + message, budget)
    return t1, t2


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--first", type=int, default=200, help="tokens of turn 1's prompt")
    parser.add_argument("--message", type=int, default=20, help="tokens of turn 2's new message")
    parser.add_argument("--reply", type=int, default=16, help="tokens of each reply")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    model = looplm.load(args.model, dtype=args.dtype)
    vocab = model.config.vocab_size
    results: dict[str, list[tuple[float, float]]] = {"store": [], "none": []}
    for round_ in range(args.rounds):
        gen = torch.Generator().manual_seed(round_)
        first = torch.randint(3, vocab, (args.first,), generator=gen).tolist()
        message = torch.randint(3, vocab, (args.message,), generator=gen).tolist()
        for name in ("store", "none") if round_ % 2 == 0 else ("none", "store"):
            engine = Engine(model, max_context=1024, prefix_cache_bytes=(1 << 30) if name == "store" else 0).start()
            try:
                results[name].append(conversation(engine, first, message, args.reply))
            finally:
                engine.stop()
            print(f"round {round_ + 1}/{args.rounds} {name}: {results[name][-1]}", file=sys.stderr)
    print(f"{model.source}, {args.dtype}, {torch.get_num_threads()} threads; turn 1 prompt {args.first} tokens, "
          f"replies {args.reply} tokens, turn 2 adds {args.message}; {args.rounds} rounds")
    print("| turn | first token, no store (s) | first token, prefix store (s) | no store / store |")
    print("|---|---|---|---|")
    for turn in (0, 1):
        a = [r[turn] for r in results["none"]]
        b = [r[turn] for r in results["store"]]
        print(f"| {turn + 1} | {spread(a)} | {spread(b)} | {spread([x / y for x, y in zip(a, b)])}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
