"""Measure what the tiny default model learned: per-loop arithmetic accuracy and gate early exit.

    python scripts/tiny_ouro_report.py [MODEL_DIR] [--out docs/tiny-ouro] [--n 500]

Writes arithmetic.json (the shared results format), gate.json, accuracy_by_steps.png and
gate_exit.png under --out, prints markdown tables, and as its last stdout line one JSON object.

Accuracy: greedy exact match on `--n` held-out problems of the shipped task (1-digit operands,
2-4 terms), at 1, 2, 3, 4 fixed loops and with the gate, with a 95% Wilson interval, overall and
per number of terms.

Gate evidence: teacher-forced held-out arithmetic lines plus a fixed English sample. For each
token we take the per-step losses and the step the gate exits at (first step whose fp32 CDF
reaches the threshold). Tokens are grouped by kind (operand digit, '=', answer digit, newline,
English) and by difficulty (how much the loss drops from step 1 to step 4).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import looplm
from looplm.eval.arithmetic import TASK, score_problems
from looplm.exit import threshold_exit_steps
from looplm.train.data import END_OF_TEXT, TINY_MAX_DIGITS, TINY_MAX_TERMS, Problem, arithmetic_problems
from looplm.train.objective import per_step_token_loss

ENGLISH = (
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have now?\n"
    "Answer: Tom has 3 + 5 = 8 apples.\nThe answer is 8.\n"
    "KING. What say you, my lord? Shall we go forth into the field tonight?\n"
)


@torch.inference_mode()
def token_exits(model, ids: list[int], threshold: float) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Per-step losses `[T, S-1]` of each next token and the 1-based exit step `[S-1]` of the position before it."""
    x = torch.tensor([ids])
    out = model.forward_steps(x[:, :-1])
    losses = per_step_token_loss(out.logits, x[:, 1:])[:, 0]
    exit_steps = threshold_exit_steps(out.exit_probs.float(), threshold, cdf_dtype=torch.float32)[0] + 1
    return losses, exit_steps


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0 and 1 too)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_row(problems: list[Problem], correct: list[bool], steps: int, policy: str, threshold: float | None,
                 mean_steps: float) -> dict:
    """One result row in `looplm eval arithmetic`'s format, plus the interval and a per-terms split."""
    hits = sum(correct)
    lo, hi = wilson(hits, len(problems))
    by_terms = {}
    for terms in sorted({p.terms for p in problems}):
        picked = [c for p, c in zip(problems, correct) if p.terms == terms]
        t_lo, t_hi = wilson(sum(picked), len(picked))
        by_terms[str(terms)] = {"n": len(picked), "accuracy": sum(picked) / len(picked), "ci95": [t_lo, t_hi]}
    return {"steps": steps, "exit_policy": policy, "exit_threshold": threshold, "accuracy": hits / len(problems),
            "mean_steps": mean_steps, "n": len(problems), "ci95": [lo, hi], "by_terms": by_terms}


def accuracy_study(model, n: int, threshold: float) -> dict:  # noqa: ANN001
    problems = arithmetic_problems(n, seed=1234, held_out=True, max_digits=TINY_MAX_DIGITS, max_terms=TINY_MAX_TERMS)
    rows = []
    for steps in (1, 2, 3, 4):
        correct, mean_steps = score_problems(model, problems, steps)
        rows.append(accuracy_row(problems, correct, steps, "last", None, mean_steps))
    correct, mean_steps = score_problems(model, problems, 4, exit_threshold=threshold)
    rows.append(accuracy_row(problems, correct, 4, "threshold", threshold, mean_steps))
    return {"task": TASK, "model": model.source, "results": rows}


@torch.inference_mode()
def answer_token_study(model, n: int) -> dict:  # noqa: ANN001
    """Teacher-forced per-loop CE and top-1 accuracy of the answer tokens (digits and the closing newline),
    first answer token separately: a finer depth signal than exact match."""
    tok = model.tokenizer
    eot = tok.token_to_id(END_OF_TEXT)
    problems = arithmetic_problems(n, seed=1234, held_out=True, max_digits=TINY_MAX_DIGITS, max_terms=TINY_MAX_TERMS)
    ce, hits, first_ce, first_hits, count = 0.0, 0.0, 0.0, 0.0, 0
    for start in range(0, n, 100):
        chunk = problems[start : start + 100]
        prompts = [[eot] + tok.encode(p.prompt) for p in chunk]
        answers = [tok.encode(p.answer + "\n") for p in chunk]
        rows = [q + a for q, a in zip(prompts, answers)]
        width = max(map(len, rows))
        x = torch.tensor([r + [eot] * (width - len(r)) for r in rows])  # right padding: causal, so harmless
        out = model.forward_steps(x[:, :-1])
        losses = per_step_token_loss(out.logits, x[:, 1:])  # (T, B, S-1)
        correct = (out.logits.argmax(-1) == x[:, 1:]).float()
        for i, (q, a) in enumerate(zip(prompts, answers)):
            span = slice(len(q) - 1, len(q) - 1 + len(a))  # positions that predict the answer tokens
            ce = ce + losses[:, i, span].sum(-1)
            hits = hits + correct[:, i, span].sum(-1)
            first_ce = first_ce + losses[:, i, len(q) - 1]
            first_hits = first_hits + correct[:, i, len(q) - 1]
            count += len(a)
    return {"problems": n, "answer_tokens": count, "ce": (ce / count).tolist(), "top1": (hits / count).tolist(),
            "first_ce": (first_ce / n).tolist(), "first_top1": (first_hits / n).tolist()}


def gate_study(model, threshold: float, n_lines: int) -> dict:  # noqa: ANN001
    tok = model.tokenizer
    eot = tok.token_to_id(END_OF_TEXT)
    groups: dict[str, list[tuple[float, float, int]]] = {}

    def add(kind: str, losses: torch.Tensor, step: torch.Tensor, index: int) -> None:
        groups.setdefault(kind, []).append((float(losses[0, index]), float(losses[-1, index]), int(step[index])))

    problems = arithmetic_problems(n_lines, seed=99, held_out=True, max_digits=TINY_MAX_DIGITS,
                                   max_terms=TINY_MAX_TERMS)
    for start in range(0, len(problems), 8):
        block = problems[start : start + 8]
        ids = [eot]
        kinds = []
        for p in block:
            parts = [(str(p.a), "operand digit"), (p.op, "operator"), (str(p.b), "operand digit")]
            for op, number in p.rest:
                parts += [(op, "operator"), (str(number), "operand digit")]
            parts += [("=", "'='"), (p.answer, "answer digit"), ("\n", "newline")]
            for part, kind in parts:
                piece = tok.encode(part)
                ids += piece
                kinds += [kind] * len(piece)
        losses, steps = token_exits(model, ids, threshold)
        for index, kind in enumerate(kinds):  # token index+1 is predicted at position index
            if kind == "answer digit" and index > 0 and kinds[index - 1] == "'='":
                kind = "first answer digit"
            add(kind, losses, steps, index)
    ids = [eot] + tok.encode(ENGLISH)
    losses, steps = token_exits(model, ids, threshold)
    for index in range(len(ids) - 1):
        add("English text", losses, steps, index)

    by_kind = {}
    for kind, rows in groups.items():
        by_kind[kind] = {
            "tokens": len(rows),
            "ce_step1": sum(r[0] for r in rows) / len(rows),
            "ce_last": sum(r[1] for r in rows) / len(rows),
            "mean_exit_step": sum(r[2] for r in rows) / len(rows),
            "exit_by_step2": sum(r[2] <= 2 for r in rows) / len(rows),
        }
    every = [r for rows in groups.values() for r in rows]
    every.sort(key=lambda r: r[0] - r[1])  # loss improvement from step 1 to the last step
    quarter = len(every) // 4
    by_gain = {}
    for name, rows in (("smallest gain (easy)", every[:quarter]), ("largest gain (hard)", every[-quarter:])):
        by_gain[name] = {"tokens": len(rows), "gain": sum(r[0] - r[1] for r in rows) / len(rows),
                         "mean_exit_step": sum(r[2] for r in rows) / len(rows)}
    return {"threshold": threshold, "by_kind": by_kind, "by_gain": by_gain}


def plots(arith: dict, gate: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = [r for r in arith["results"] if r["exit_policy"] == "last"]
    gated = [r for r in arith["results"] if r["exit_policy"] == "threshold"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [r["steps"] for r in fixed]

    def errors(rows: list[dict], key=lambda r: r) -> list[list[float]]:  # noqa: ANN001
        return [[100 * (key(r)["accuracy"] - key(r)["ci95"][0]) for r in rows],
                [100 * (key(r)["ci95"][1] - key(r)["accuracy"]) for r in rows]]

    ax.errorbar(xs, [100 * r["accuracy"] for r in fixed], yerr=errors(fixed), marker="o", capsize=3,
                label=f"all (n={fixed[0]['n']})")
    for terms, style in zip(sorted(fixed[0]["by_terms"]), ("s--", "^:", "v-.")):
        n = fixed[0]["by_terms"][terms]["n"]
        ax.errorbar(xs, [100 * r["by_terms"][terms]["accuracy"] for r in fixed], fmt=style, capsize=2, alpha=0.8,
                    yerr=errors(fixed, key=lambda r, t=terms: r["by_terms"][t]), label=f"{terms} terms (n={n})")
    for r in gated:
        ax.errorbar([r["mean_steps"]], [100 * r["accuracy"]], yerr=errors([r]), fmt="x", ms=9, capsize=3,
                    color="black", label=f"gate, threshold {r['exit_threshold']} (mean steps)")
    ax.set_xlabel("UT steps (loops) per token")
    ax.set_ylabel("exact-match accuracy (%), 95% CI")
    ax.set_title("held-out chains like 7-8+9-5=, 1-digit operands")
    ax.set_xticks([1, 2, 3, 4])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_by_steps.png", dpi=110)
    plt.close(fig)

    kinds = sorted(gate["by_kind"], key=lambda k: gate["by_kind"][k]["mean_exit_step"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.barh(kinds, [gate["by_kind"][k]["mean_exit_step"] for k in kinds], color="tab:blue")
    ax.set_xlabel(f"mean exit step (gate CDF >= {gate['threshold']})")
    ax.set_xlim(1, 4)
    ax.set_title("where the trained gate exits, by token kind")
    fig.tight_layout()
    fig.savefig(out / "gate_exit.png", dpi=110)
    plt.close(fig)


def accuracy_table(arith: dict) -> str:
    terms = sorted(arith["results"][0]["by_terms"])
    head = "| steps | exit policy | mean steps | accuracy (95% CI) | n | " + " | ".join(f"{t} terms" for t in terms) + " |"
    lines = [head, "|" + "---|" * (5 + len(terms))]
    for r in arith["results"]:
        policy = "last" if r["exit_threshold"] is None else f"gate, threshold {r['exit_threshold']}"
        split = " | ".join(f"{100 * r['by_terms'][t]['accuracy']:.1f}% (n={r['by_terms'][t]['n']})" for t in terms)
        lines.append(f"| {r['steps']} | {policy} | {r['mean_steps']:.2f} | {100 * r['accuracy']:.1f}% "
                     f"({100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}) | {r['n']} | {split} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/tiny-ouro"))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--gate-lines", type=int, default=200)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = looplm.load(args.model, dtype="float32")
    args.out.mkdir(parents=True, exist_ok=True)
    arith = accuracy_study(model, args.n, args.threshold)
    gate = gate_study(model, args.threshold, args.gate_lines)
    gate["answer_tokens"] = answer_token_study(model, args.n)
    (args.out / "arithmetic.json").write_text(json.dumps(arith, indent=2) + "\n")
    (args.out / "gate.json").write_text(json.dumps(gate, indent=2) + "\n")
    plots(arith, gate, args.out)
    print(accuracy_table(arith))
    study = gate["answer_tokens"]
    print()
    print(f"teacher-forced answer tokens ({study['answer_tokens']} tokens, {study['problems']} problems), loops 1-4:")
    for key in ("ce", "top1", "first_ce", "first_top1"):
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in study[key]) + " |")
    print()
    print("| token kind | tokens | CE step 1 | CE step 4 | mean exit step | exits by step 2 |")
    print("|---|---|---|---|---|---|")
    for kind, row in sorted(gate["by_kind"].items(), key=lambda kv: kv[1]["mean_exit_step"]):
        print(f"| {kind} | {row['tokens']} | {row['ce_step1']:.3f} | {row['ce_last']:.3f} | "
              f"{row['mean_exit_step']:.2f} | {100 * row['exit_by_step2']:.0f}% |")
    print()
    for name, row in gate["by_gain"].items():
        print(f"{name}: {row['tokens']} tokens, loss gain step 1->4 {row['gain']:.3f}, mean exit step {row['mean_exit_step']:.2f}")
    print(json.dumps({"arithmetic": arith["results"], "gate": gate}))


if __name__ == "__main__":
    main(sys.argv[1:])
