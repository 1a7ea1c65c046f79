"""`looplm eval TASK`: benchmark tasks (and the held-out arithmetic task) -> table, results.json, plot.

`looplm eval merge` joins the per-item records of shards. The work is in `looplm.eval.harness`.
"""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from looplm.cli import common
from looplm.errors import LooplmError
from looplm.output_files import check_writable, write_result
from looplm.server import DEFAULT_PREFIX_CACHE_MB

eval_app = typer.Typer(help="Evaluate a model on a task; results in the shared results.json format.", no_args_is_help=True)
common.app.add_typer(eval_app, name="eval")


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LooplmError(f"--steps must be comma-separated integers such as 1,2,3,4, got {text!r}") from None
    if not steps:
        raise LooplmError("--steps needs at least one loop count")
    return steps


@eval_app.command()
def arithmetic(
    model: common.Model = None,
    dtype: common.Dtype = "float32",
    device: common.Device = "auto",
    steps: Annotated[Optional[str], typer.Option(help="Loop counts, comma-separated (default 1..T).")] = None,
    exit_threshold: common.ExitThreshold = None,
    n: Annotated[int, typer.Option("--n", "--limit", help="Held-out problems.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed that picks the held-out problems.")] = 1234,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results JSON here.")] = None,
    threads: common.Threads = None,
) -> None:
    """Exact-match accuracy on held-out arithmetic (1-digit chains of 2-4 terms, e.g. 7-8+9-5=), per loop count
    (read at the last loop), and with --exit-threshold the gate's exit at the largest."""
    from looplm.eval.arithmetic import evaluate_arithmetic, format_table
    from looplm.exit import check_threshold

    step_list = parse_steps(steps) if steps else None
    if n < 1:
        raise LooplmError(f"--n must be at least 1, got {n}")
    if exit_threshold is not None:  # the gate's
        check_threshold("gate", exit_threshold)
    check_writable(output, "--output")
    common.set_threads(threads)
    lm = common.load_model(model, dtype, device, None, needs_text=True)
    step_list = step_list or list(range(1, lm.config.total_ut_steps + 1))
    results = evaluate_arithmetic(lm, step_list, n=n, seed=seed, exit_threshold=exit_threshold)
    common.stdout().print(format_table(results))
    _write(results, output, None, plot_default=False)


def _run_task(task: str, model, dtype, device, limit, steps, exit_policy, exit_threshold, batch_size,  # noqa: ANN001
              output, records, plot, shard, chat, num_fewshot, max_new_tokens, allow_code_execution,
              skip_compute, kv_mode="full", decoder="auto", threads=None, prefix_cache_mb=DEFAULT_PREFIX_CACHE_MB) -> None:
    from looplm.eval.harness import EvalSettings, parse_policies, parse_shard, plan
    from looplm.eval.report import results_table

    settings = EvalSettings(
        task=task, steps=parse_steps(steps) if steps else [], limit=limit, batch_size=batch_size,
        policies=parse_policies(exit_policy, exit_threshold), shard=parse_shard(shard), chat=chat,
        num_fewshot=num_fewshot, max_new_tokens=max_new_tokens, allow_code_execution=allow_code_execution,
        skip_compute=skip_compute, kv_mode=kv_mode, decoder=decoder, prefix_cache_mb=prefix_cache_mb,
    )
    common.DecodeOptions(None, kv_mode, skip_compute, decoder)  # checks --kv-mode and --decoder
    if limit is not None and limit < 1:
        raise LooplmError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise LooplmError(f"--batch-size must be at least 1, got {batch_size}")
    if prefix_cache_mb < 0:
        raise LooplmError(f"--prefix-cache-mb must be 0 or more, got {prefix_cache_mb}")
    if num_fewshot < 0:
        raise LooplmError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise LooplmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    task_spec, _ = plan(settings)  # data and flags are checked before the model loads
    if records is None:
        suffix = "" if settings.shard is None else f"-shard-{settings.shard[0]}-of-{settings.shard[1]}"
        records = output.with_suffix(".jsonl") if output else Path(f"looplm-eval-{task}{suffix}.jsonl")
    plot = plot or (output.with_suffix(".png") if output is not None else None)
    for path, option in ((output, "--output"), (records, "--records"), (plot, "--plot")):
        check_writable(path, option)
    common.set_threads(threads)
    lm = common.load_model(model, dtype, device, None, needs_text=True)
    if task_spec.kind != "loglik":  # a decoder the device or the options rule out fails before any work
        from looplm.generate import resolve_decoder

        resolve_decoder(decoder, lm, True, kv_mode, skip_compute)
    settings.steps = settings.steps or list(range(1, lm.config.total_ut_steps + 1))
    results = _with_progress(lambda progress: run_eval(lm, settings, records, progress))
    common.stdout().print(results_table(results))
    _write(results, output, plot)
    common.stderr().print(f"per-item records: {records}")


def run_eval(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    from looplm.eval.harness import run_eval as run

    return run(*args, **kwargs)


def _with_progress(work):  # noqa: ANN001, ANN202
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=common.stderr(), transient=False) as bar:
        def start(total: int):  # noqa: ANN202
            handle = bar.add_task("evaluating", total=total)
            return lambda done: bar.advance(handle, done)

        return work(start)


def _write(results: dict, output: Optional[Path], plot: Optional[Path], plot_default: bool = True) -> None:
    from looplm.eval.report import plot_results

    kept = "the table above has the results"
    if output is not None:
        write_result(output, json.dumps(results, indent=2) + "\n", kept)
    plot = plot or (output.with_suffix(".png") if output is not None and plot_default else None)
    if plot is not None:
        write_result(plot, lambda path: plot_results(results, path), kept)


def _task_command(task: str, summary: str):  # noqa: ANN202
    def command(
        model: common.Model = None,
        dtype: common.Dtype = "float32",
        device: common.Device = "auto",
        limit: Annotated[Optional[int], typer.Option(help="Evaluate N items, spread evenly over the set.")] = None,
        steps: Annotated[Optional[str], typer.Option(help="Loop counts, comma-separated (default 1..T).")] = None,
        exit_policy: Annotated[Optional[str], typer.Option(
            "--exit-policy", help="Exit policies at the largest loop count, comma-separated, each NAME or "
            "NAME:THRESHOLD, e.g. gate:0.5,confidence:0.9,weighted.")] = None,
        exit_threshold: Annotated[Optional[float], typer.Option(
            help="Threshold for policies given without one.")] = None,
        batch_size: Annotated[int, typer.Option(
            help="Sequences per forward pass; for generation tasks, rows decoding at once.")] = 8,
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results.json here.")] = None,
        records: Annotated[Optional[Path], typer.Option(
            help="Per-item JSONL (resumes from it); default: OUTPUT with .jsonl, else ./looplm-eval-TASK.jsonl.")] = None,
        plot: Annotated[Optional[Path], typer.Option(help="Accuracy-vs-steps PNG (default: OUTPUT with .png).")] = None,
        shard: Annotated[Optional[str], typer.Option(help="Evaluate shard i of n (i/n): every n-th item from i.")] = None,
        chat: Annotated[Optional[bool], typer.Option(
            "--chat/--no-chat", help="Wrap prompts in the chat template (default: yes for generation, no for "
            "multiple choice).", show_default=False)] = None,
        num_fewshot: Annotated[int, typer.Option(help="Few-shot examples (gsm8k: from the train split).")] = 0,
        max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation budget (default: per task).")] = None,
        allow_code_execution: Annotated[bool, typer.Option(help="Run model-written code (humaneval).")] = False,
        skip_compute: Annotated[bool, typer.Option(help="Generation: exited tokens run no further loops.")] = False,
        kv_mode: Annotated[str, typer.Option(help="Generation: KV cache mode, full or shared.")] = "full",
        decoder: common.Decoder = "auto",
        prefix_cache_mb: Annotated[int, typer.Option(
            help="Generation: MiB of finished answers' K/V kept for prompts that start the same way (few-shot "
            "examples), so only the rest is prefilled; 0 turns it off.")] = DEFAULT_PREFIX_CACHE_MB,
        threads: common.Threads = None,
    ) -> None:
        _run_task(task, model, dtype, device, limit, steps, exit_policy, exit_threshold, batch_size, output, records,
                  plot, shard, chat, num_fewshot, max_new_tokens, allow_code_execution, skip_compute, kv_mode, decoder,
                  threads, prefix_cache_mb)

    command.__doc__ = summary
    eval_app.command(name=task)(command)


for _name, _summary in (
    ("gsm8k", "GSM8K test: greedy chat answers, \\boxed{} / #### extraction, math-verify equivalence."),
    ("math500", "MATH-500: greedy chat answers, \\boxed{} extraction, math-verify equivalence."),
    ("mmlu", "MMLU test (cloze form), scored by log-likelihood (acc_norm)."),
    ("hellaswag", "HellaSwag (100-row sample), scored by log-likelihood (acc_norm)."),
    ("aime25", "AIME 2025 I+II: greedy chat answers, math-verify equivalence."),
    ("gpqa", "GPQA-diamond, lettered choices scored by log-likelihood."),
    ("humaneval", "HumanEval pass@1 (greedy); needs --allow-code-execution."),
):
    _task_command(_name, _summary)


@eval_app.command()
def merge(
    records: Annotated[list[Path], typer.Argument(help="Per-item .jsonl records of the shards.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the merged results.json.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Accuracy-vs-steps PNG (default: OUTPUT with .png).")] = None,
) -> None:
    """Merge the records of shards (or of resumed runs) into one results.json."""
    from looplm.eval.harness import merge_records
    from looplm.eval.report import results_table

    check_writable(output, "--output")
    check_writable(plot, "--plot")
    results = merge_records(records)
    common.stdout().print(results_table(results))
    _write(results, output, plot)
