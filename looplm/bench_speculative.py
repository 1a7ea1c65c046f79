"""Self-speculative decoding, measured: acceptance and speed on the trained embedded model, round costs on a real shape.

Part 1, a trained looped model (default: the embedded tiny-ouro, the only one here; `--model`
takes a real Ouro checkpoint, on which part 1 measures the real thing): greedy decoding of
fixed prompts from its training domains, for each draft depth k (1 .. T-1) and drafts per round
γ, against normal decoding in the same run: acceptance, tokens per round, whether every token
equals normal decoding's, and the decode speed ratio (repeats alternate normal and speculative
runs; median [min-max] of the per-repeat ratios).

Part 2, the cost of a round on a real shape (random weights, bf16, the CPU path): the time of a
normal decode step and of one speculative round (γ drafts of k loops, one verify pass of T - k
loops over γ positions). A round emits (1 - α^γ) / (1 - α) tokens on average when each draft is
accepted with probability α, so its speed-up over normal decoding is that number x step time /
round time. Random weights make their own acceptance meaningless, so the table pairs the measured
round cost with the acceptance part 1 measured for the same k and γ: a projection, since the tiny
model's acceptance is not Ouro-1.4B's, and the break-even acceptance, which needs no projection.

`python -m looplm.bench_speculative --help`, or `looplm bench --speculative`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from looplm.errors import LooplmError, exit_code_of
from looplm.output_files import PRINTED_ABOVE, check_writable, write_result

# Prompts from the embedded model's training domains (Shakespeare, GSM8K-style word problems,
# arithmetic chains), not drawn from its training files.
PROMPTS = (
    "ROMEO:\nWhat light through yonder window",
    "KING HENRY:\nNow, lords, the day is ours;",
    "Question: A baker sells 12 loaves a day for 5 days. How many loaves does she sell?\nAnswer:",
    "Question: Tom has 3 boxes with 7 pens each. He gives away 5 pens. How many are left?\nAnswer:",
    "3+4-2+8-1=",
)

Log = Callable[[str], None]


def spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def expected_tokens_per_round(acceptance: float, draft_tokens: int) -> float:
    """Mean tokens a round emits when each draft is kept with probability `acceptance`:
    the kept prefix plus the correction, at most `draft_tokens` (full acceptance adds no extra)."""
    if acceptance >= 1.0:
        return float(draft_tokens)
    return (1.0 - acceptance**draft_tokens) / (1.0 - acceptance)


def break_even_acceptance(round_over_step: float, draft_tokens: int) -> float | None:
    """The acceptance at which a round costs the same per token as normal decoding (bisection);
    None when even full acceptance does not pay for the round."""
    if expected_tokens_per_round(1.0, draft_tokens) < round_over_step:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if expected_tokens_per_round(middle, draft_tokens) < round_over_step:
            low = middle
        else:
            high = middle
    return high


def measure_acceptance(new_tokens: int, draft_tokens: Sequence[int], confidences: Sequence[float], repeats: int,
                       log: Log, model_path: str | None = None, dtype: str = "bfloat16") -> dict:
    """Part 1 on a trained model (default: the embedded one): fixed rounds of each γ, then rounds
    of up to max(γ) drafts that end at the first draft below each confidence."""
    import looplm
    from looplm.generate import generate

    model = looplm.load(model_path, dtype=dtype)
    if model.tokenizer is None:
        raise LooplmError(f"{model.source}: part 1 encodes text prompts and this model has no tokenizer")
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    steps = model.config.total_ut_steps

    def run(**kwargs: object) -> tuple[list[list[int]], float, list]:
        outputs, seconds, stats_list = [], 0.0, []
        for prompt in prompts:
            out, stats = generate(model, [prompt], new_tokens, eos_token_ids=[], return_stats=True, **kwargs)
            outputs.append(out[0])
            seconds += stats.decode_s
            stats_list.append(stats)
        return outputs, seconds, stats_list

    run()  # warm up
    configs = [(gamma, 0.0) for gamma in draft_tokens] + [(max(draft_tokens), tau) for tau in confidences]
    rows = []
    for k in range(1, steps):
        for gamma, tau in configs:
            log(f"embedded model: draft {k} of {steps} loops, {'up to ' if tau else ''}{gamma} drafts per round"
                + (f", ending below confidence {tau}" if tau else ""))
            ratios, identical = [], len(prompts)
            for _ in range(repeats):
                normal, normal_s, _ = run()
                spec, spec_s, stats_list = run(draft_steps=k, draft_tokens=gamma, draft_confidence=tau)
                identical = min(identical, sum(a == b for a, b in zip(spec, normal)))
                ratios.append(normal_s / spec_s)
            proposed = sum(s.draft_proposed for s in stats_list)
            accepted = sum(s.draft_accepted for s in stats_list)
            rounds = sum(s.draft_rounds for s in stats_list)
            emitted = sum(s.new_tokens - 1 for s in stats_list)
            rows.append({"draft_steps": k, "draft_tokens": gamma, "draft_confidence": tau,
                         "acceptance": accepted / proposed, "mean_drafts": proposed / rounds,
                         "tokens_per_round": emitted / rounds, "identical_prompts": identical,
                         "speedup": spread(ratios)})
    return {"model": model.source, "dtype": str(model.dtype).removeprefix("torch."), "steps": steps,
            "prompts": len(prompts), "new_tokens": new_tokens, "repeats": repeats, "rows": rows}


def measure_round_cost(shape: str, draft_tokens: Sequence[int], rounds: int, prompt_len: int, workdir: Path | None,
                       log: Log) -> dict:
    """Part 2 on a real shape: step and round times, random weights."""
    import looplm
    from looplm.bench import bench_home, ensure_checkpoint
    from looplm.exit import make_policy
    from looplm.generate import generate
    from looplm.sampling import SamplingParams
    from looplm.speculative import DraftParams, SpeculativeDecoder

    path, written = ensure_checkpoint(shape, workdir or bench_home())
    log(f"{shape}: checkpoint {'written' if written else 'found'} at {path}")
    model = looplm.load(path, dtype="bfloat16")
    steps = model.config.total_ut_steps
    policy = make_policy(None, None, steps, model.config.early_exit_threshold, model.config.early_exit_step)
    prompt = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    def step_time() -> float:
        _, stats = generate(model, prompt, rounds + 1, eos_token_ids=[], return_stats=True)
        return stats.decode_s / rounds

    costs = []
    for k in range(1, steps):
        for gamma in draft_tokens:
            log(f"{shape}: normal steps, then rounds drafting with {k} of {steps} loops, {gamma} drafts")
            step = step_time()  # next to the rounds it is compared with: the machine drifts
            with torch.inference_mode():
                decoder = SpeculativeDecoder(model, prompt, None, 2 + rounds * gamma, steps, policy, SamplingParams(),
                                             None, DraftParams(k, gamma))
                pending, _ = decoder.prefill()
                times = []
                for _ in range(rounds):
                    begin = time.perf_counter()
                    result = decoder.round(pending)
                    times.append(time.perf_counter() - begin)
                    pending = result.tokens[-1]
            round_over_step = statistics.median(times) / step
            costs.append({"draft_steps": k, "draft_tokens": gamma, "round_s": spread(times), "step_s": step,
                          "round_over_step": round_over_step,
                          "break_even_acceptance": break_even_acceptance(round_over_step, gamma)})
    step_s = [c["step_s"] for c in costs]
    return {"shape": shape, "steps": steps, "prompt_len": prompt_len, "rounds": rounds,
            "threads": torch.get_num_threads(), "step_s": spread(step_s), "rows": costs}


def round_cost_fit(cost: dict) -> dict[int, tuple[float, float]]:
    """Per draft depth k, a least-squares line round/step = a + b x drafts over the measured γ
    (a verify pass and b per draft; the rows show it is close to linear)."""
    fits = {}
    for k in sorted({r["draft_steps"] for r in cost["rows"]}):
        points = [(r["draft_tokens"], r["round_over_step"]) for r in cost["rows"] if r["draft_steps"] == k]
        if len({x for x, _ in points}) < 2:
            continue
        mean_x = statistics.fmean(x for x, _ in points)
        mean_y = statistics.fmean(y for _, y in points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        fits[k] = (mean_y - slope * mean_x, slope)
    return fits


def _cost_bound(measured: dict[tuple[int, int], float], k: int, drafts: float) -> float:
    """The measured cost of the cheapest fixed round of depth k that drafts at least `drafts`
    tokens (else of the most drafts measured): a round that drafts fewer costs no more, so the
    projection made with it is a lower bound."""
    rows = sorted((gamma, cost) for (depth, gamma), cost in measured.items() if depth == k)
    return next((cost for gamma, cost in rows if gamma >= drafts), rows[-1][1])


def projections(acceptance: dict, cost: dict) -> list[dict]:
    """Part 1's measured tokens per round over part 2's round cost in decode steps: the measured
    cost for fixed rounds, the fitted line at the mean number of drafts for rounds that end early
    (or, where noise put that line at or below zero, the `_cost_bound`: source "bound")."""
    measured = {(r["draft_steps"], r["draft_tokens"]): r["round_over_step"] for r in cost["rows"]}
    fits = round_cost_fit(cost)
    out = []
    for row in acceptance["rows"]:
        k = row["draft_steps"]
        if row["draft_confidence"]:
            if k not in fits:
                continue
            intercept, slope = fits[k]
            round_over_step, source = intercept + slope * row["mean_drafts"], "fit"
            if round_over_step <= 0:  # noise tilted a two-point line below zero: no cost at all
                round_over_step, source = _cost_bound(measured, k, row["mean_drafts"]), "bound"
        else:
            if (k, row["draft_tokens"]) not in measured:
                continue
            round_over_step, source = measured[(k, row["draft_tokens"])], "measured"
        out.append({"draft_steps": k, "draft_tokens": row["draft_tokens"], "draft_confidence": row["draft_confidence"],
                    "tokens_per_round": row["tokens_per_round"], "round_over_step": round_over_step,
                    "cost_source": source, "projected_speedup": row["tokens_per_round"] / round_over_step})
    return out


def drafts_label(row: dict) -> str:
    """'2', or 'up to 6, stop below 0.5' for rounds that end at an unsure draft."""
    if row.get("draft_confidence"):
        return f"up to {row['draft_tokens']}, stop below {row['draft_confidence']:g}"
    return str(row["draft_tokens"])


def format_report(result: dict) -> str:
    lines = []
    acc = result.get("acceptance")
    if acc:
        title = (f"Part 1: {acc['model']} ({acc['dtype']}, {acc['steps']} loops), greedy, {acc['prompts']} prompts x "
                 f"{acc['new_tokens']} tokens, {acc['repeats']} repeats alternating normal / speculative")
        header = ("| draft loops | drafts per round | mean drafts | acceptance | tokens per round "
                  "| prompts with normal's tokens | decode speed-up here, median [min-max] |")
        lines += [title, "", header, "|---|---|---|---|---|---|---|"]
        for r in acc["rows"]:
            s = r["speedup"]
            lines.append(f"| {r['draft_steps']} | {drafts_label(r)} | {r['mean_drafts']:.2f} | {r['acceptance']:.0%} "
                         f"| {r['tokens_per_round']:.2f} | {r['identical_prompts']}/{acc['prompts']} | "
                         f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}] |")
        lines.append("")
    cost = result.get("cost")
    if cost:
        st = cost["step_s"]
        title = (f"Part 2: Ouro {cost['shape']} shape, random weights, bf16, {cost['threads']} threads, prompt "
                 f"{cost['prompt_len']}: normal decode step {st['median'] * 1000:.0f} ms "
                 f"[{st['min'] * 1000:.0f}-{st['max'] * 1000:.0f}], measured before each row's rounds and "
                 "divided into that row's round time")
        header = "| draft loops | drafts per round | round ms, median [min-max] | round / step | break-even acceptance |"
        lines += [title, "", header, "|---|---|---|---|---|"]
        for r in cost["rows"]:
            rs = r["round_s"]
            even = "never" if r["break_even_acceptance"] is None else f"{r['break_even_acceptance']:.0%}"
            lines.append(f"| {r['draft_steps']} | {r['draft_tokens']} | {rs['median'] * 1000:.0f} "
                         f"[{rs['min'] * 1000:.0f}-{rs['max'] * 1000:.0f}] | {r['round_over_step']:.2f} | {even} |")
        lines.append("")
    projected = result.get("projections")
    if projected:
        title = (f"Projection: part 1's tokens per round over part 2's round cost on the {cost['shape']} shape "
                 "(measured, or the per-depth line fitted to it at the mean number of drafts)")
        header = ("| draft loops | drafts per round | tokens per round (part 1) | round / step (part 2) "
                  "| projected speed-up |")
        lines += [title, "", header, "|---|---|---|---|---|"]
        for p in projected:
            lines.append(f"| {p['draft_steps']} | {drafts_label(p)} | {p['tokens_per_round']:.2f} | "
                         f"{p['round_over_step']:.2f} ({p['cost_source']}) | {p['projected_speedup']:.2f}x |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m looplm.bench_speculative", description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default=None,
                        help="part 1: a trained looped model (directory or hub id; default: the embedded model). "
                             "On real Ouro weights part 1 measures acceptance and speed directly")
    parser.add_argument("--dtype", default="bfloat16", help="part 1: the model's dtype")
    parser.add_argument("--new-tokens", type=int, default=96, help="part 1: tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="part 1: alternating repeats")
    parser.add_argument("--draft-tokens", default="2,3,4,6", help="comma-separated drafts per round")
    parser.add_argument("--confidences", default="0.1,0.3",
                        help="part 1: also rounds of up to max(--draft-tokens) drafts that end at the first draft "
                             "below each of these probabilities (comma-separated; empty: none)")
    parser.add_argument("--shape", default="1.4b", help="part 2: an Ouro shape (1.4b, 2.6b), or 'none' to skip it")
    parser.add_argument("--rounds", type=int, default=3, help="part 2: timed rounds (and normal steps) per row")
    parser.add_argument("--prompt-len", type=int, default=32, help="part 2: prompt length")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="where part 2's random checkpoint lives")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log: Log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        draft_tokens = [int(t) for t in args.draft_tokens.split(",") if t.strip()]
        confidences = [float(t) for t in args.confidences.split(",") if t.strip()]
        if not draft_tokens or min(draft_tokens) < 1 or min(args.new_tokens, args.repeats, args.rounds) < 1:
            raise ValueError
        if any(not 0.0 < c < 1.0 for c in confidences):
            raise ValueError
    except ValueError:
        print("error: --draft-tokens takes positive integers (e.g. 2,4,6), --confidences numbers in (0, 1); "
              "--new-tokens, --repeats and --rounds must be positive", file=sys.stderr)
        return 1
    try:  # every option before part 1 runs (it takes minutes)
        from looplm.bench import SHAPES

        if args.shape != "none" and args.shape not in SHAPES:
            raise LooplmError(f"unknown shape '{args.shape}' (choose {', '.join(SHAPES)}, or none)")
        if args.threads is not None and args.threads < 1:
            raise LooplmError(f"--threads must be a positive integer, got {args.threads}")
        if args.prompt_len < 1:
            raise LooplmError(f"--prompt-len must be a positive integer, got {args.prompt_len}")
        check_writable(args.json_out, "--json-out")
        if args.threads:
            torch.set_num_threads(args.threads)
        result: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}
        result["acceptance"] = measure_acceptance(args.new_tokens, draft_tokens, confidences, args.repeats, log,
                                                  args.model, args.dtype)
        if args.shape != "none":
            result["cost"] = measure_round_cost(args.shape, draft_tokens, args.rounds, args.prompt_len, args.workdir,
                                                log)
            result["projections"] = projections(result["acceptance"], result["cost"])
    except LooplmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    document = json.dumps(result)
    print(document, flush=True)
    if args.json_out:
        return exit_code_of(lambda: write_result(args.json_out, document + "\n", PRINTED_ABOVE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
