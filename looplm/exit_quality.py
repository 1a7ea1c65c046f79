"""Quality vs compute of exit policies and KV modes, measured by teacher-forced decoding.

A held-out text is split into a prefix (prefilled with every step, as in generation) and a
continuation fed one token at a time through the real decode path (`decode_step`), so the
policy's exits, the compute skipping and the KV fill strategy all act exactly as they do when
generating. Each row reports the continuation's perplexity and the mean steps per token.

    python -m looplm.exit_quality -m MODEL --text held_out.txt --output docs/exit-quality.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

import looplm
from looplm.exit import FixedPolicy, make_policy
from looplm.models.ouro import OuroForCausalLM

# (label, policy, threshold, kv_mode, skip_compute)
DEFAULT_GRID: list[tuple[str, str, float | None, str, bool]] = [
    ("last", "last", None, "full", False),
    ("last, kv shared", "last", None, "shared", False),
    *((f"fixed {n}", "fixed", float(n), "full", True) for n in (1, 2, 3)),
    *((f"gate {t}", "gate", t, "full", True) for t in (0.5, 0.7, 0.9)),
    *((f"gate {t}, kv shared", "gate", t, "shared", True) for t in (0.5, 0.9)),
    ("gate 0.5, no skip", "gate", 0.5, "full", False),
    *((f"confidence {t}", "confidence", t, "full", True) for t in (0.5, 0.8)),
    *((f"kl {t}", "kl", t, "full", True) for t in (0.05, 0.01)),
    ("weighted", "weighted", None, "full", False),
]


@torch.inference_mode()
def teacher_forced(
    model: OuroForCausalLM,
    ids: Sequence[int],
    prefix_len: int,
    policy_name: str,
    threshold: float | None,
    kv_mode: str,
    skip_compute: bool,
) -> dict:
    """NLL of `ids[prefix_len:]` decoded one token at a time; the steps each token used."""
    total = model.config.total_ut_steps
    tokens = torch.tensor([list(ids)])
    cache = model.make_cache(1, len(ids), total, kv_mode=kv_mode, prompt_len=prefix_len)
    if policy_name == "fixed":  # every step in the prefill, `threshold` loops per decoded token
        policy = FixedPolicy(int(threshold))
    else:
        policy = make_policy(policy_name, threshold, total, model.config.early_exit_threshold)
    out = model.run_steps(tokens[:, :prefix_len], torch.arange(prefix_len).unsqueeze(0), None, cache, total)
    logits, exit_step = model.readout(out, policy, position=-1)
    nll, used = 0.0, []
    for position in range(prefix_len, len(ids)):
        target = int(tokens[0, position])
        nll -= float(torch.log_softmax(logits[0].float(), -1)[target])
        used.append(int(exit_step[0]) + 1)
        if position == len(ids) - 1:
            break
        logits, exit_step = model.decode_step(
            tokens[:, position : position + 1], torch.tensor([[position]]), None, cache, total, policy, skip_compute
        )
    return {"nll": nll, "tokens": len(used), "steps": used}


def evaluate(model: OuroForCausalLM, documents: list[list[int]], prefix_len: int, grid=DEFAULT_GRID) -> list[dict]:  # noqa: ANN001
    rows = []
    for label, policy, threshold, kv_mode, skip in grid:
        nll, count, steps = 0.0, 0, []
        for ids in documents:
            result = teacher_forced(model, ids, prefix_len, policy, threshold, kv_mode, skip)
            nll, count, steps = nll + result["nll"], count + result["tokens"], steps + result["steps"]
        rows.append({"config": label, "exit_policy": policy, "exit_threshold": threshold, "kv_mode": kv_mode,
                     "skip_compute": skip, "perplexity": math.exp(nll / count), "mean_steps": sum(steps) / len(steps),
                     "tokens": count})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Perplexity vs mean steps for each exit policy and KV mode.")
    parser.add_argument("-m", "--model", default=None, help="model directory, hub id or .gguf (default: embedded)")
    parser.add_argument("--text", type=Path, required=True, help="held-out text file")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--length", type=int, default=96, help="tokens per document, prefix included")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    model = looplm.load(args.model, dtype=args.dtype)
    ids = model.tokenizer.encode(args.text.read_text(encoding="utf-8"))
    documents = [ids[i : i + args.length] for i in range(0, len(ids) - args.length, args.length)][: args.documents]
    rows = evaluate(model, documents, args.prefix_len)
    from rich.console import Console
    from rich.table import Table

    table = Table("config", "perplexity", "mean steps", "tokens", title=f"{model.source}: teacher-forced decoding")
    for r in rows:
        table.add_row(r["config"], f"{r['perplexity']:.3f}", f"{r['mean_steps']:.2f}", str(r["tokens"]))
    Console().print(table)
    result = {"model": model.source, "text": str(args.text), "prefix_len": args.prefix_len, "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
