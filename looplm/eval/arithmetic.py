"""The held-out arithmetic task: exact-match accuracy of greedy answers, per loop count.

Problems come from `looplm.train.data.arithmetic_problems(held_out=True)`: a hash split that
training never draws from. By default they follow the shipped model's task (1-digit operands,
2-4 terms, e.g. `7-8+9-5=`). The prompt is `<|endoftext|>` + the problem up to `=`, tokenized
exactly as inside a training line, and the answer is read up to the first newline. Decoding is greedy and recomputes the whole (short) sequence each token,
so the exit rule is applied here, explicitly, per token:

- `exit_policy="last"`: run `steps` loops and read the last one's logits (fixed depth), one row
  per loop count.
- `exit_policy="gate"` (when an `exit_threshold` is given, one more row at the largest loop
  count): read, per token, the first step whose cumulative exit probability (fp32) reaches
  `exit_threshold`; `mean_steps` is the average step read over answer tokens.

The results follow the other tasks' results.json (`task`, `model`, `metric`: "exact_match",
`results`).
"""

from __future__ import annotations

import torch

from looplm.config import MIN_STEPS
from looplm.errors import LooplmError
from looplm.exit import gather_steps, threshold_exit_steps
from looplm.models.ouro import OuroForCausalLM
from looplm.train.data import END_OF_TEXT, TINY_MAX_DIGITS, TINY_MAX_TERMS, Problem, arithmetic_problems

TASK = "arithmetic"
METRIC = "exact_match"


@torch.inference_mode()
def greedy_answers(
    model: OuroForCausalLM,
    prompts: list[list[int]],
    steps: int,
    exit_threshold: float | None,
    max_new_tokens: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy continuations of left-padded `prompts`; also the 1-based UT step read for each new token."""
    pad = model.generation_defaults.get("pad_token_id", 0) or 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    new_ids, new_steps = [], []
    for _ in range(max_new_tokens):
        out = model.run_steps(ids, _positions(mask), key_valid=mask.bool(), steps=steps)
        hidden, probs = out.hidden_states[:, :, -1:], out.exit_probs[:, :, -1:]  # (T, B, 1, H), (T, B, 1)
        if exit_threshold is None:
            exit_steps = torch.full(probs.shape[1:], steps - 1, dtype=torch.long, device=ids.device)
        else:
            exit_steps = threshold_exit_steps(probs, exit_threshold, cdf_dtype=torch.float32)
        logits = model.lm_head(gather_steps(hidden, exit_steps))  # (B, 1, V)
        token = logits[:, -1].argmax(-1)
        new_ids.append(token)
        new_steps.append(exit_steps[:, -1] + 1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    tokens = torch.stack(new_ids, dim=1).tolist()
    used = torch.stack(new_steps, dim=1).tolist()
    return tokens, used


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def score_problems(
    model: OuroForCausalLM,
    problems: list[Problem],
    steps: int,
    exit_threshold: float | None = None,
    batch_size: int = 125,
) -> tuple[list[bool], float]:
    """Greedy exact match of each problem at `steps` loops, and the mean step read over answer tokens."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise LooplmError("the arithmetic eval needs the model's tokenizer; this model was loaded without one")
    most = model.config.max_steps
    if not isinstance(steps, int) or not MIN_STEPS <= steps <= most:
        raise LooplmError(f"steps must be integers from {MIN_STEPS} to {most}, got {steps!r}")
    eot = tokenizer.token_to_id(END_OF_TEXT)
    prefix = [eot] if eot is not None else []  # training documents start right after <|endoftext|>
    correct: list[bool] = []
    step_sum, step_count = 0, 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [prefix + tokenizer.encode(p.prompt) for p in chunk]
        # Room for the longest answer plus the newline that ends it (and one token of slack).
        max_new = max(len(p.answer) for p in chunk) + 2
        tokens, used = greedy_answers(model, prompts, steps, exit_threshold, max_new_tokens=max_new)
        for problem, row, row_steps in zip(chunk, tokens, used):
            answer = tokenizer.decode(row).split("\n", 1)[0]
            correct.append(answer.strip() == problem.answer)
            kept = _answer_token_count(tokenizer, row)
            step_sum += sum(row_steps[:kept])
            step_count += kept
    return correct, step_sum / max(1, step_count)


def evaluate_arithmetic(
    model: OuroForCausalLM,
    steps_list: list[int],
    n: int = 500,
    seed: int = 1234,
    exit_threshold: float | None = None,
    batch_size: int = 125,
    max_digits: int = TINY_MAX_DIGITS,
    max_terms: int = TINY_MAX_TERMS,
) -> dict:
    """Exact-match accuracy on `n` held-out problems for each loop count in `steps_list`."""
    if model.tokenizer is None:
        raise LooplmError("the arithmetic eval needs the model's tokenizer; this model was loaded without one")
    problems = arithmetic_problems(n, seed=seed, held_out=True, max_digits=max_digits, max_terms=max_terms)
    rows: list[tuple[int, float | None]] = [(steps, None) for steps in steps_list]
    if exit_threshold is not None:  # the gate at the largest loop count, beside the fixed depths
        rows.append((max(steps_list), exit_threshold))
    results = []
    for steps, threshold in rows:
        correct, mean_steps = score_problems(model, problems, steps, threshold, batch_size)
        results.append({
            "steps": steps,
            "exit_policy": "last" if threshold is None else "gate",
            "exit_threshold": threshold,
            "accuracy": sum(correct) / len(problems),
            "mean_steps": mean_steps,
            "n": len(problems),
        })
    return {"task": TASK, "model": model.source, "metric": METRIC, "results": results}


def _answer_token_count(tokenizer, row: list[int]) -> int:  # noqa: ANN001
    """Tokens up to and including the one that ends the answer line (all if none does)."""
    for index in range(len(row)):
        if "\n" in tokenizer.decode(row[: index + 1]):
            return index + 1
    return len(row)


def format_table(results: dict) -> str:
    lines = ["| steps | exit policy | accuracy | mean steps | n |", "|---|---|---|---|---|"]
    for r in results["results"]:
        policy = r["exit_policy"] if r["exit_threshold"] is None else f"{r['exit_policy']} {r['exit_threshold']}"
        lines.append(f"| {r['steps']} | {policy} | {r['accuracy']:.3f} | {r['mean_steps']:.2f} | {r['n']} |")
    return "\n".join(lines)


__all__ = ["Problem", "TASK", "evaluate_arithmetic", "format_table", "greedy_answers", "score_problems"]
