"""Self-speculative decoding of a batch against one prompt, on the embedded model (bf16, CPU).

Rows of a batch share one cache length, so a round keeps only the drafts every row accepted.
This prints, for a batch of 4 prompts and for the first prompt alone, the share of drafts kept,
the new tokens per round and the decode speed against normal decoding of the same batch,
measured side by side (median [min-max] over --repeats runs).
"""

from __future__ import annotations

import argparse
import statistics

import looplm
from looplm.generate import generate

PROMPTS = ["ROMEO:\nWhat light through yonder window", "7-8+9-5=", "The king is dead; long live", "Question: 12+7"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-steps", type=int, default=2)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = looplm.load()
    prompts = [model.tokenizer.encode(text) for text in PROMPTS]
    common = {"eos_token_ids": [], "return_stats": True}
    print("| prompts | drafts kept | new tokens per round | decode speed vs normal, median [min-max] |")
    print("|---|---|---|---|")
    for batch in (prompts, prompts[:1]):
        runs = []
        for _ in range(args.repeats):
            _, normal = generate(model, batch, args.new_tokens, **common)
            _, spec = generate(model, batch, args.new_tokens, draft_steps=args.draft_steps,
                               draft_tokens=args.draft_tokens, **common)
            runs.append((spec.draft_acceptance, (spec.new_tokens - 1) / spec.draft_rounds,
                         normal.decode_s / spec.decode_s))
        kept, per_round, speed = zip(*runs)
        print(f"| {len(batch)} | {statistics.median(kept):.0%} | {statistics.median(per_round):.2f} | "
              f"{statistics.median(speed):.2f}x [{min(speed):.2f}-{max(speed):.2f}] |")


if __name__ == "__main__":
    main()
