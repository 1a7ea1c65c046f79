"""Benchmark: what adaptive exit and KV sharing buy at decode time.

On random weights with a real Ouro shape (bf16, CPU, batch 1) the prompt is prefilled once;
every configuration then decodes from a copy of that cache, so all rows of the table are
measured side by side in one run on the same prefix:
- `fixed` at 1..T steps (with skipping, a token runs only that many loops);
- `gate` at a threshold, with skipping: the random gate gives a mix of exit steps, and the
  rate predicted from the `fixed` rows for that same mix is printed beside the measured one;
- `last` with the shared KV mode vs the full one.
Then KV bytes per token in both modes at a 4K context for the 1.4B and 2.6B shapes.
The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import looplm
from looplm.bench import SHAPES, bench_home, ensure_checkpoint, machine_info
from looplm.cache import KVCache, kv_bytes_per_token
from looplm.errors import LooplmError, exit_code_of
from looplm.exit import check_threshold, make_policy
from looplm.models.ouro import OuroForCausalLM
from looplm.output_files import PRINTED_ABOVE, check_writable, write_result


def clone_cache(model: OuroForCausalLM, prefilled: KVCache, prompt_len: int, new_tokens: int, kv_mode: str) -> KVCache:
    """A fresh cache of the requested mode holding a copy of the prefilled prompt."""
    cache = model.make_cache(1, prompt_len + new_tokens, kv_mode=kv_mode, prompt_len=prompt_len)
    cache.keys[:, :, :, :prompt_len] = prefilled.keys[:, :, :, :prompt_len]
    cache.values[:, :, :, :prompt_len] = prefilled.values[:, :, :, :prompt_len]
    cache.length = prompt_len
    return cache


@torch.inference_mode()
def decode_run(
    model: OuroForCausalLM,
    prefilled: KVCache,
    first_token: torch.Tensor,
    prompt_len: int,
    new_tokens: int,
    policy_name: str,
    threshold: float | None,
    steps: int,
    kv_mode: str,
) -> tuple[float, list[int]]:
    """Greedy-decode `new_tokens` tokens; returns (tok/s, exit steps used per token)."""
    cache = clone_cache(model, prefilled, prompt_len, new_tokens, kv_mode)
    policy = make_policy(policy_name, threshold, steps, model.config.early_exit_threshold)
    token, used = first_token, []
    start = time.perf_counter()
    for index in range(new_tokens):
        position = torch.tensor([[prompt_len + index]])
        logits, exit_step = model.decode_step(token, position, None, cache, steps, policy, skip_compute=True)
        token = logits.argmax(-1, keepdim=True)
        used.append(int(exit_step[0]) + 1)
    return new_tokens / (time.perf_counter() - start), used


def run(shape: str, prompt_len: int, new_tokens: int, repeats: int, gate_threshold: float, workdir: Path) -> dict:
    path, _ = ensure_checkpoint(shape, workdir)
    model = looplm.load(path, dtype="bfloat16")
    total = model.config.total_ut_steps
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prefilled = model.make_cache(1, prompt_len, total)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.run_steps(prompt, torch.arange(prompt_len).unsqueeze(0), None, prefilled, total)
        first = model.lm_head(out.hidden_states[-1, :, -1]).argmax(-1, keepdim=True)
    prefill_s = time.perf_counter() - start

    configs = [(f"fixed {n}", "fixed", None, n, "full") for n in range(1, total + 1)]
    configs += [
        (f"gate {gate_threshold}", "gate", gate_threshold, total, "full"),
        ("last, kv full", "last", None, total, "full"),
        ("last, kv shared", "last", None, total, "shared"),
        (f"gate {gate_threshold}, kv shared", "gate", gate_threshold, total, "shared"),
    ]
    # Repeats are the outer loop: every configuration is sampled in each round, so drift in the
    # machine's load spreads over all rows instead of biasing whichever ran last.
    for _, policy, threshold, steps, kv_mode in configs:
        decode_run(model, prefilled, first, prompt_len, 2, policy, threshold, steps, kv_mode)  # warm-up
    rates: dict[str, list[float]] = {label: [] for label, *_ in configs}
    used: dict[str, list[int]] = {}
    for _ in range(repeats):
        for label, policy, threshold, steps, kv_mode in configs:
            rate, used[label] = decode_run(model, prefilled, first, prompt_len, new_tokens, policy, threshold,
                                           steps, kv_mode)
            rates[label].append(rate)
    rows = []
    for label, policy, threshold, _, kv_mode in configs:
        rows.append({"config": label, "policy": policy, "threshold": threshold, "kv_mode": kv_mode,
                     "tok_s": statistics.median(rates[label]), "min": min(rates[label]), "max": max(rates[label]),
                     "mean_steps": sum(used[label]) / len(used[label]), "steps_per_token": used[label]})
    fixed = {r["mean_steps"]: r["tok_s"] for r in rows if r["policy"] == "fixed"}
    for row in rows:
        row["ratio_vs_fixed_max"] = row["tok_s"] / fixed[float(total)]
        if row["policy"] == "gate":  # what the fixed-depth rates predict for the same mix of exits
            seconds = sum(1.0 / fixed[float(n)] for n in row["steps_per_token"]) / len(row["steps_per_token"])
            row["predicted_tok_s"] = 1.0 / seconds
    return {"shape": shape, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "prefill_s": prefill_s, "rows": rows, "kv": kv_table(), "machine": machine_info()}


def kv_table(context: int = 4096, prompt: int = 512) -> list[dict]:
    """KV bytes (bf16) per decoded token and for a 4K context (512 prompt + 3584 decoded tokens)."""
    table = []
    for shape in ("1.4b", "2.6b"):
        c = SHAPES[shape]
        args = (c["total_ut_steps"], c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"], 2)
        full, shared = kv_bytes_per_token(*args, "full"), kv_bytes_per_token(*args, "shared")
        table.append({"shape": shape, "full_per_token": full, "shared_per_token": shared,
                      "full_at_context": full * context,
                      "shared_at_context": full * prompt + shared * (context - prompt)})
    return table


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = result["machine"]
    console.print(f"[bold]looplm exit/KV benchmark[/] shape {result['shape']}, bf16, batch 1, "
                  f"prompt {result['prompt_len']}, {result['new_tokens']} new tokens x {result['repeats']} repeats; "
                  f"prefill once in {result['prefill_s']:.1f} s; {m.get('cpu_model', '?')} ({m.get('cpu_capability', '?')}), {m.get('torch_threads')} threads")
    table = Table("config", "decode tok/s (median)", "min-max", "x fixed-max", "mean steps", "predicted tok/s")
    for r in result["rows"]:
        predicted = f"{r['predicted_tok_s']:.3f}" if "predicted_tok_s" in r else ""
        table.add_row(r["config"], f"{r['tok_s']:.3f}", f"{r['min']:.3f}-{r['max']:.3f}",
                      f"{r['ratio_vs_fixed_max']:.2f}", f"{r['mean_steps']:.2f}", predicted)
    console.print(table)
    kv = Table("shape", "KV/token full", "KV/token shared", "4K ctx full", "4K ctx shared (512 prompt)")
    for r in result["kv"]:
        kv.add_row(r["shape"], f"{r['full_per_token'] / 2**10:.0f} KiB", f"{r['shared_per_token'] / 2**10:.0f} KiB",
                   f"{r['full_at_context'] / 2**30:.2f} GiB", f"{r['shared_at_context'] / 2**30:.2f} GiB")
    console.print(kv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.4b", choices=sorted(SHAPES))
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gate-threshold", type=float, default=0.5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    for flag, value in (("--prompt-len", args.prompt_len), ("--new-tokens", args.new_tokens), ("--repeats", args.repeats)):
        if value < 1:  # before the checkpoint is built and loaded, not a traceback after
            raise LooplmError(f"{flag} must be a positive integer, got {value}")
    check_threshold("gate", args.gate_threshold)
    check_writable(args.json_out, "--json-out")
    result = run(args.shape, args.prompt_len, args.new_tokens, args.repeats, args.gate_threshold,
                 args.workdir or bench_home())
    print_report(result)
    print(json.dumps(result), flush=True)
    if args.json_out:
        write_result(args.json_out, json.dumps(result, indent=2), PRINTED_ABOVE)
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code_of(main))
