"""Quality vs compute of exit policies and KV modes: perplexity, arithmetic and GSM8K accuracy.

Every measurement goes through the real decode path, so the policy's exits, the compute
skipping and the KV fill strategy act exactly as they do when generating:

- perplexity: a held-out text is split into a prefix (prefilled with every step, as in
  generation) and a continuation fed one token at a time through `decode_step` (teacher
  forcing); `mean_steps` is the mean loop read (with skipping: run) per scored token.
- arithmetic: exact match of greedy answers to held-out `a+b=` problems
  (`looplm.train.data.arithmetic_problems(held_out=True)`), decoded with `decode_tokens`;
  `mean_steps` is over the answer tokens (up to the newline or eos that ends the answer).
- GSM8K: the eval harness (`looplm.eval.harness.run_eval`), which decodes through `generate`.

A row of the grid (`Setting`) is one configuration. `fixed n` prefills the prompt with all T
loops, like every policy, and gives each new token n loops. With the full KV cache this equals
running n loops everywhere (`--steps n`, the harness's per-loop rows), since loop t attends only
to the loop-t K/V of earlier tokens, which a prompt's first n loops compute identically whatever
follows; GSM8K's `fixed n` rows are therefore the harness's `steps=n` rows.

    python -m looplm.exit_quality -m MODEL --text held_out.txt --output docs/exit-quality.json
    python scripts/exit_quality_report.py      # every measurement, the docs' JSON and PNG
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import looplm
from looplm.errors import exit_code_of
from looplm.exit import ExitPolicy, FixedPolicy, make_policy
from looplm.models.ouro import OuroForCausalLM
from looplm.output_files import PRINTED_ABOVE, check_writable, write_result


@dataclass(frozen=True)
class Setting:
    """One configuration: how many loops each token gets and how it decides to stop."""

    label: str
    policy: str  # an exit policy name (looplm.exit.POLICY_NAMES)
    threshold: float | None = None  # the policy's threshold; for "fixed": the loops per new token
    kv_mode: str = "full"
    skip_compute: bool = False

    def make(self, model: OuroForCausalLM) -> ExitPolicy:
        if self.policy == "fixed":  # every step in the prefill, `threshold` loops per new token
            return FixedPolicy(int(self.threshold))
        config = model.config
        return make_policy(self.policy, self.threshold, self.loops(model), config.early_exit_threshold,
                           config.early_exit_step)

    def loops(self, model: OuroForCausalLM) -> int:
        return model.config.total_ut_steps


def _grid() -> list[Setting]:
    skip = dict(skip_compute=True)
    return [
        Setting("last (= fixed 4)", "last"),
        Setting("last, kv shared", "last", kv_mode="shared"),
        Setting("weighted", "weighted"),
        # The default policy: the reference's gate rule at the config's threshold (1.0), no skipping.
        Setting("gate 1.0 (default)", "gate", 1.0),
        *(Setting(f"fixed {n}", "fixed", float(n), **skip) for n in (1, 2, 3)),
        *(Setting(f"gate {t}", "gate", t, **skip) for t in (0.5, 0.7, 0.9)),
        Setting("gate 0.5, no skip", "gate", 0.5),
        *(Setting(f"gate {t}, kv shared", "gate", t, kv_mode="shared", **skip) for t in (0.5, 0.9)),
        *(Setting(f"confidence {t}", "confidence", t, **skip) for t in (0.5, 0.8, 0.9)),
        *(Setting(f"kl {t}", "kl", t, **skip) for t in (0.05, 0.01, 0.001)),
        Setting("kl 0.05, kv shared", "kl", 0.05, kv_mode="shared", **skip),
    ]


DEFAULT_GRID: list[Setting] = _grid()

# -- perplexity ----------------------------------------------------------------------------------


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
    setting = Setting("", policy_name, threshold, kv_mode, skip_compute)
    return teacher_forced_batch(model, [ids], prefix_len, setting)[0]


@torch.inference_mode()
def teacher_forced_batch(model: OuroForCausalLM, documents: Sequence[Sequence[int]], prefix_len: int,
                         setting: Setting) -> list[dict]:
    """`teacher_forced` for documents of one length at once, as rows of a batch.

    A batch gives each row what it gets alone (rows exit and skip independently; tested in
    tests/test_exit_policies.py), and on a CPU one batched step costs little more than one row's.
    """
    total = setting.loops(model)
    tokens = torch.tensor([list(ids) for ids in documents])  # (B, L)
    batch, length = tokens.shape
    cache = model.make_cache(batch, length, total, kv_mode=setting.kv_mode, prompt_len=prefix_len)
    policy = setting.make(model)
    positions = torch.arange(prefix_len).expand(batch, prefix_len)
    out = model.run_steps(tokens[:, :prefix_len], positions, None, cache, total)
    logits, exit_step = model.readout(out, policy, position=-1)
    nll = torch.zeros(batch, dtype=torch.float64)
    used = []
    for position in range(prefix_len, length):
        target = tokens[:, position : position + 1]  # (B, 1)
        nll -= torch.log_softmax(logits.float(), -1).gather(1, target).squeeze(1).double()
        used.append(exit_step + 1)
        if position == length - 1:
            break
        logits, exit_step = model.decode_step(target, torch.full((batch, 1), position), None, cache, total, policy,
                                              setting.skip_compute)
    steps = torch.stack(used, dim=1).tolist()  # (B, L - prefix_len)
    return [{"nll": float(nll[row]), "tokens": length - prefix_len, "steps": steps[row]} for row in range(batch)]


def _row(setting: Setting, **measured: object) -> dict:
    """A JSON row: the configuration, then what was measured."""
    return {"config": setting.label, "exit_policy": setting.policy, "exit_threshold": setting.threshold,
            "kv_mode": setting.kv_mode, "skip_compute": setting.skip_compute, **measured}


def evaluate(model: OuroForCausalLM, documents: list[list[int]], prefix_len: int,
             grid: Iterable[Setting] = DEFAULT_GRID) -> list[dict]:
    """Perplexity of every document's continuation, and mean steps, per setting."""
    rows = []
    for setting in grid:
        nll, steps = 0.0, []
        for result in teacher_forced_batch(model, documents, prefix_len, setting):
            nll, steps = nll + result["nll"], steps + result["steps"]
        rows.append(_row(setting, perplexity=math.exp(nll / len(steps)), mean_steps=sum(steps) / len(steps),
                         tokens=len(steps), early_exits=sum(n < setting.loops(model) for n in steps)))
    return rows


def split_documents(ids: list[int], length: int, count: int) -> list[list[int]]:
    """The first `count` disjoint windows of `length` tokens."""
    return [ids[i : i + length] for i in range(0, len(ids) - length, length)][:count]


def gsm8k_heldout_text(items: int = 40) -> str:
    """The first GSM8K *test* items with worked answers (the model trained on train splits only),
    written exactly as the training text was (`looplm.train.data.gsm8k_documents`)."""
    from looplm.assets import fetch_asset
    from looplm.train.data import gsm8k_documents

    return "".join(gsm8k_documents(fetch_asset("gsm8k-test"))[:items])


# -- arithmetic ----------------------------------------------------------------------------------


def held_out_problems(n: int, seed: int, max_digits: int, max_terms: int) -> list:
    from looplm.train.data import arithmetic_problems

    return arithmetic_problems(n, seed=seed, held_out=True, max_digits=max_digits, max_terms=max_terms)


def arithmetic_accuracy(model: OuroForCausalLM, problems: list, setting: Setting, batch_size: int = 125) -> dict:
    """Exact-match accuracy of greedy answers and the mean steps of the answer tokens."""
    from looplm.generate import GenerationStats, decode_tokens, prepare_inputs
    from looplm.sampling import SamplingParams
    from looplm.train.data import END_OF_TEXT

    tokenizer = model.tokenizer
    eot = tokenizer.token_to_id(END_OF_TEXT)
    eos = set(model.stop_ids)
    pad = model.generation_defaults.get("pad_token_id", 0) or 0
    max_new = max(len(p.answer) for p in problems) + 2  # the answer, the newline, one spare
    correct, step_sum, step_count = 0, 0, 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [([eot] if eot is not None else []) + tokenizer.encode(p.prompt) for p in chunk]
        ids, mask = prepare_inputs(prompts, None, pad)
        columns = list(decode_tokens(model, ids, mask, max_new, SamplingParams(), None, setting.make(model), True,
                                     setting.loops(model), GenerationStats(), setting.kv_mode, setting.skip_compute))
        for row, problem in enumerate(chunk):
            tokens = [int(t[row]) for t, _ in columns]
            used = [int(s[row]) + 1 for _, s in columns]
            kept = _answer_length(tokenizer, tokens, eos)
            correct += tokenizer.decode(tokens[:kept]).split("\n", 1)[0].strip() == problem.answer
            step_sum, step_count = step_sum + sum(used[:kept]), step_count + kept
    return {"accuracy": correct / len(problems), "mean_steps": step_sum / max(1, step_count), "n": len(problems)}


def _answer_length(tokenizer, tokens: list[int], eos: set[int]) -> int:  # noqa: ANN001
    """Tokens up to and including the one that ends the answer: a newline or an eos id."""
    for index, token in enumerate(tokens):
        if token in eos or "\n" in tokenizer.decode([token]):
            return index + 1
    return len(tokens)


def arithmetic_rows(model: OuroForCausalLM, problems: list, grid: Iterable[Setting] = DEFAULT_GRID) -> list[dict]:
    return [_row(s, **arithmetic_accuracy(model, problems, s)) for s in grid]


# -- GSM8K through the eval harness --------------------------------------------------------------


def gsm8k_rows(model: OuroForCausalLM, limit: int, max_new_tokens: int, batch_size: int = 50,
               grid: Iterable[Setting] = DEFAULT_GRID) -> list[dict]:
    """GSM8K test accuracy per setting, with the harness's greedy decoding and answer checking.

    The harness runs one skip/KV mode per call, so settings are grouped by (kv_mode, skip_compute).
    `fixed n` is the harness's n-loop row (the same computation with the full cache; module doc).
    Prompts are plain text (the tiny model never saw a chat template).
    """
    from looplm.eval.harness import EvalSettings, run_eval
    from looplm.eval.loglik import Config

    total = model.config.total_ut_steps
    groups: dict[tuple[str, bool], list[tuple[Setting, Config]]] = {}
    for s in grid:
        if s.policy in ("last", "fixed"):
            config = Config(int(s.threshold) if s.policy == "fixed" else total)
        else:
            config = Config(total, s.policy, s.threshold)
        skip = s.skip_compute and s.policy != "fixed"  # n loops everywhere: nothing left to skip
        groups.setdefault((s.kv_mode, skip), []).append((s, config))
    rows = []
    for (kv_mode, skip), members in groups.items():
        steps = sorted({c.steps for _, c in members if c.exit_policy == "last"}) or [total]
        policies = [(c.exit_policy, c.exit_threshold) for _, c in members if c.exit_policy != "last"]
        settings = EvalSettings(task="gsm8k", steps=steps, policies=policies, limit=limit, batch_size=batch_size,
                                chat=False, max_new_tokens=max_new_tokens, skip_compute=skip, kv_mode=kv_mode)
        results = {(r["steps"], r["exit_policy"], r["exit_threshold"]): r for r in run_eval(model, settings)["results"]}
        for s, c in members:
            r = results[(c.steps, c.exit_policy, c.exit_threshold)]
            rows.append(_row(s, accuracy=r["accuracy"], mean_steps=r["mean_steps"], n=r["n"]))
    order = {s.label: i for i, s in enumerate(grid)}
    return sorted(rows, key=lambda r: order[r["config"]])


# -- the command ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Perplexity vs mean steps for each exit policy and KV mode.")
    parser.add_argument("-m", "--model", default=None, help="model directory, hub id or .gguf (default: embedded)")
    parser.add_argument("--text", type=Path, default=None,
                        help="held-out text file (default: the first 40 GSM8K test items with worked answers)")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--length", type=int, default=96, help="tokens per document, prefix included")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    check_writable(args.output, "--output")
    model = looplm.load(args.model, dtype=args.dtype)
    text = args.text.read_text(encoding="utf-8") if args.text else gsm8k_heldout_text()
    documents = split_documents(model.tokenizer.encode(text), args.length, args.documents)
    total = model.config.total_ut_steps
    grid = [s for s in DEFAULT_GRID if s.policy != "fixed" or s.threshold <= total]
    rows = evaluate(model, documents, args.prefix_len, grid)
    from rich.console import Console
    from rich.table import Table

    table = Table("config", "perplexity", "mean steps", "tokens", title=f"{model.source}: teacher-forced decoding")
    for r in rows:
        table.add_row(r["config"], f"{r['perplexity']:.3f}", f"{r['mean_steps']:.2f}", str(r["tokens"]))
    Console().print(table)
    result = {"model": model.source, "text": str(args.text or "gsm8k test"), "prefix_len": args.prefix_len,
              "rows": rows}
    print(json.dumps(result), flush=True)
    if args.output:
        write_result(args.output, json.dumps(result, indent=2), PRINTED_ABOVE)
    return 0


__all__ = ["DEFAULT_GRID", "Setting", "arithmetic_accuracy", "arithmetic_rows", "evaluate", "gsm8k_heldout_text",
           "gsm8k_rows", "held_out_problems", "split_documents", "teacher_forced", "teacher_forced_batch"]

if __name__ == "__main__":
    raise SystemExit(exit_code_of(main))
