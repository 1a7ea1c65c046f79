"""Regenerate docs/exit-quality-tiny-ouro.{json,png}: quality vs compute for every exit policy.

    nice -n 5 python scripts/exit_quality_report.py [--model DIR] [--out docs/exit-quality-tiny-ouro]
        [--only perplexity,arithmetic,gsm8k,smollm2,default-bf16]

Measurements (all through the real decode path; see looplm/exit_quality.py):
- perplexity: teacher-forced held-out GSM8K test text (the model trained on train splits only);
- arithmetic: exact match on held-out problems of the model's task (`--digits`, `--terms`);
- gsm8k: accuracy on a GSM8K test slice through the eval harness (greedy, plain-text prompts);
- smollm2: the 1-loop sanity check, perplexity of the SmolLM2-135M GGUF under every policy,
  which must be identical (T=1: every policy reads the only step);
- default-bf16: how often the default rule (gate at threshold 1.0) exits before the last loop
  with its running sums in bf16 vs fp32.

`--only` reruns some sections and keeps the others from the existing JSON. Prints a markdown
table; the last stdout line is the JSON document.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import looplm
from looplm.exit_quality import (
    DEFAULT_GRID,
    Setting,
    arithmetic_rows,
    evaluate,
    gsm8k_heldout_text,
    gsm8k_rows,
    held_out_problems,
    split_documents,
)
from looplm.train.data import TINY_MAX_DIGITS, TINY_MAX_TERMS

SECTIONS = ("gsm8k", "perplexity", "arithmetic", "smollm2", "default-bf16")  # longest first
REPO = Path(__file__).resolve().parents[1]


def wilson(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion (sensible near 0, where accuracies of this model sit)."""
    if n == 0:
        return 0.0, 0.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def one_loop_grid(total: int) -> list[Setting]:
    """The settings a model with `total` loops can run (all of them share the only step when total is 1)."""
    return [s for s in DEFAULT_GRID if s.policy != "fixed" or s.threshold <= total]


def tiny(args: argparse.Namespace):  # noqa: ANN201
    return looplm.load(args.model, dtype="float32")


def run_perplexity(args: argparse.Namespace) -> dict:
    model = tiny(args)
    documents = split_documents(model.tokenizer.encode(gsm8k_heldout_text()), args.length, args.documents)
    rows = evaluate(model, documents, args.prefix_len, DEFAULT_GRID)
    return {"text": "GSM8K test items 0-39, question + worked answer in the training format",
            "documents": len(documents), "prefix_len": args.prefix_len, "length": args.length, "rows": rows}


def run_arithmetic(args: argparse.Namespace) -> dict:
    model = tiny(args)
    problems = held_out_problems(args.n, args.seed, args.digits, args.terms)
    rows = arithmetic_rows(model, problems, DEFAULT_GRID)
    for row in rows:
        row["ci95"] = wilson(row["accuracy"], row["n"])
    return {"n": len(problems), "seed": args.seed, "max_digits": args.digits, "max_terms": args.terms, "rows": rows}


def run_gsm8k(args: argparse.Namespace) -> dict:
    rows = gsm8k_rows(tiny(args), args.gsm8k_limit, args.gsm8k_tokens, batch_size=args.gsm8k_batch)
    for row in rows:
        row["ci95"] = wilson(row["accuracy"], row["n"])
    return {"limit": args.gsm8k_limit, "max_new_tokens": args.gsm8k_tokens, "batch_size": args.gsm8k_batch,
            "chat": False,
            "prompt": "plain text: question + the harness's \\boxed{} instruction", "rows": rows}


def run_smollm2(args: argparse.Namespace) -> dict:
    from looplm.assets import fetch_asset

    path = fetch_asset("smollm2-gguf")
    model = looplm.load(str(path), dtype="float32")
    documents = split_documents(model.tokenizer.encode(gsm8k_heldout_text()), args.smol_length, args.smol_documents)
    rows = evaluate(model, documents, args.prefix_len, one_loop_grid(model.config.total_ut_steps))
    values = {row["perplexity"] for row in rows}
    return {"model": path.name, "total_ut_steps": model.config.total_ut_steps, "documents": len(documents),
            "prefix_len": args.prefix_len, "length": args.smol_length, "identical": len(values) == 1, "rows": rows}


def run_default_bf16(args: argparse.Namespace) -> dict:
    """The default rule (gate, threshold 1.0) in each dtype: how many tokens exit before the last loop."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = looplm.load(args.model, dtype=dtype)
        documents = split_documents(model.tokenizer.encode(gsm8k_heldout_text()), args.length, args.documents)
        grid = [Setting("last", "last"), Setting("gate 1.0 (default)", "gate", 1.0)]
        out[dtype] = evaluate(model, documents, args.prefix_len, grid)
    return out


RUNS = {"perplexity": run_perplexity, "arithmetic": run_arithmetic, "gsm8k": run_gsm8k, "smollm2": run_smollm2,
        "default-bf16": run_default_bf16}


def run_section(section: str, args: argparse.Namespace) -> tuple[dict, float]:
    """One section in a worker process; returns its result and wall seconds."""
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = RUNS[section](args)
    return out, round(time.perf_counter() - start, 1)


def model_version() -> str:
    """The last commit that touched the embedded model (what the numbers are of)."""
    result = subprocess.run(["git", "log", "-1", "--format=%h %cs %s", "--", "looplm/data/tiny-ouro"],
                            cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip()


def markdown(result: dict) -> str:
    """One row per setting: perplexity, arithmetic and GSM8K accuracy, each with its mean steps."""
    by_label: dict[str, dict] = {}
    for section in ("perplexity", "arithmetic", "gsm8k"):
        for row in result.get(section, {}).get("rows", []):
            by_label.setdefault(row["config"], {})[section] = row
    lines = ["| config | perplexity | steps | arithmetic exact match | steps | GSM8K correct | steps |",
             "|---|---|---|---|---|---|---|"]
    for label, cells in by_label.items():
        ppl, arith, gsm = cells.get("perplexity"), cells.get("arithmetic"), cells.get("gsm8k")
        lines.append("| " + " | ".join([
            label,
            f"{ppl['perplexity']:.2f}" if ppl else "",
            f"{ppl['mean_steps']:.2f}" if ppl else "",
            f"{100 * arith['accuracy']:.1f}%" if arith else "",
            f"{arith['mean_steps']:.2f}" if arith else "",
            f"{round(gsm['accuracy'] * gsm['n'])}/{gsm['n']}" if gsm else "",
            f"{gsm['mean_steps']:.2f}" if gsm else "",
        ]) + " |")
    smol = result.get("smollm2")
    if smol:
        values = sorted({row["perplexity"] for row in smol["rows"]})
        lines += ["", f"SmolLM2 ({smol['model']}, T={smol['total_ut_steps']}), {smol['rows'][0]['tokens']} scored "
                  f"tokens: {len(smol['rows'])} settings, {len(values)} distinct perplexities: "
                  + ", ".join(f"{v:.9f}" for v in values)]
        for value in values:
            labels = [row["config"] for row in smol["rows"] if row["perplexity"] == value]
            lines.append(f"- {value:.9f}: {', '.join(labels)}")
    default = result.get("default-bf16", {})
    for dtype in ("float32", "bfloat16"):
        rows = default.get(dtype, [])
        lines.append(f"default rule in {dtype}: " + "; ".join(
            f"{row['config']}: perplexity {row['perplexity']:.3f}, mean steps {row['mean_steps']:.3f}, "
            f"{row['early_exits']} of {row['tokens']} tokens before the last loop" for row in rows))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Quality against mean steps, one panel per measurement, one marker series per policy."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    panels = [("perplexity", "perplexity", "perplexity (lower is better)", 1.0),
              ("arithmetic", "accuracy", "arithmetic exact match, %", 100.0),
              ("gsm8k", "accuracy", "GSM8K accuracy, %", 100.0)]
    panels = [p for p in panels if result.get(p[0])]
    if not panels:
        return
    styles = {"fixed": ("k", "o"), "last": ("tab:blue", "D"),
              "weighted": ("tab:purple", "*"), "gate": ("tab:orange", "^"), "confidence": ("tab:green", "v"),
              "kl": ("tab:red", "P")}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (section, key, ylabel, scale) in zip(axes[0], panels):
        rows = result[section]["rows"]
        for family, (color, marker) in styles.items():
            mine = sorted((r for r in rows if r["exit_policy"] == family or (family == "fixed" and _full_depth(r))),
                          key=lambda r: r["mean_steps"])  # the fixed line ends at `last` (fixed T)
            if not mine:
                continue
            full = [r for r in mine if r["kv_mode"] == "full"]
            shared = [r for r in mine if r["kv_mode"] == "shared"]
            ax.plot([r["mean_steps"] for r in full], [scale * r[key] for r in full], marker=marker, color=color,
                    linestyle="-" if family == "fixed" else "none", label=family)
            if shared:
                ax.plot([r["mean_steps"] for r in shared], [scale * r[key] for r in shared], marker=marker,
                        color=color, markerfacecolor="none", linestyle="none", label=f"{family}, kv shared")
        if key == "accuracy":
            top = max(scale * r[key] for r in rows)
            ax.set_ylim(-1, max(5.0, 1.15 * top))  # accuracies near 0: keep the scale readable, not zoomed
        ax.set_xlabel("mean steps (loops) per scored token")
        ax.set_ylabel(ylabel)
        n = result[section].get("n") or result[section].get("limit") or f"{result[section].get('documents')} docs"
        ax.set_title(f"{section} (n={n})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    version = " ".join(result.get("model_version", "").split()[:2])  # commit and date of the model
    fig.suptitle(f"tiny-ouro ({version}): quality vs compute per exit policy; hollow: kv shared", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _full_depth(row: dict) -> bool:
    return row["exit_policy"] == "last" and row["kv_mode"] == "full"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded tiny-ouro)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "exit-quality-tiny-ouro",
                        help="path prefix: writes OUT.json and OUT.png")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run: {','.join(SECTIONS)}")
    parser.add_argument("--documents", type=int, default=12)
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--n", type=int, default=500, help="held-out arithmetic problems")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--digits", type=int, default=TINY_MAX_DIGITS,
                        help="arithmetic operand digits (default: the shipped tiny task's)")
    parser.add_argument("--terms", type=int, default=TINY_MAX_TERMS,
                        help="most arithmetic terms per problem (default: the shipped tiny task's)")
    parser.add_argument("--gsm8k-limit", type=int, default=50)
    parser.add_argument("--gsm8k-tokens", type=int, default=64)
    parser.add_argument("--gsm8k-batch", type=int, default=50, help="GSM8K prompts decoded together")
    parser.add_argument("--smol-documents", type=int, default=3)
    parser.add_argument("--smol-length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (the machine is shared)")
    parser.add_argument("--jobs", type=int, default=1, help="sections run in this many processes at once")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    json_path = args.out.with_suffix(".json")
    result = json.loads(json_path.read_text()) if json_path.exists() and set(only) != set(SECTIONS) else {}
    if result and "rows" in result:  # the older perplexity-only format: nothing to keep
        result = {}
    timings = result.get("wall_s", {})
    # Sections are independent: with --jobs 2 they run in two processes (each loads its own model).
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        # The longest first, so that two workers finish together.
        futures = {section: pool.submit(run_section, section, args) for section in sorted(only, key=SECTIONS.index)}
        for section, future in futures.items():
            result[section], timings[section] = future.result()
            if section != "smollm2":  # which tiny-ouro this section measured (sections may be rerun apart)
                result[section]["model_version"] = model_version()
            print(f"{section}: {timings[section]} s", flush=True)
    if any(s in only for s in ("perplexity", "arithmetic", "gsm8k", "default-bf16")):
        result.update({"model": tiny(args).source, "model_version": model_version(), "dtype": "float32",
                       "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                       "threads": args.threads, "jobs": args.jobs})
    result["wall_s"] = timings
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
