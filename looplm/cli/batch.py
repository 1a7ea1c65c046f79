"""`looplm batch INPUT -o OUTPUT`: offline batch inference over a JSONL file of OpenAI requests."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from looplm.cli import common
from looplm.errors import LooplmError
from looplm.server import DEFAULT_PREFIX_CACHE_MB


@common.app.command()
def batch(
    input_file: Annotated[Path, typer.Argument(
        help="JSONL, one request per line: an OpenAI batch line (custom_id, method, url, body) or a bare "
             "request body with messages (chat) or prompt (completions).", show_default=False)],
    output: Annotated[Path, common.option(
        "JSONL results in OpenAI's batch output format, one line per request as it finishes. If it exists, "
        "its finished requests are kept and only the rest run; a file that is not batch output is refused.",
        "--output", "-o")],
    model: common.Model = None,
    dtype: common.Dtype = "bfloat16",
    device: common.Device = "auto",
    steps: common.Steps = None,
    quant: common.Quant = None,
    group_size: common.GroupSize = None,
    max_tokens: Annotated[Optional[int], common.option(
        "max_tokens for requests that set neither max_tokens nor max_completion_tokens (default: the server's "
        "rule, up to --max-context).", default_in_help=True)] = None,
    max_context: common.MaxContext = 2048,
    max_batch: common.MaxBatch = 16,
    prefill_chunk: common.PrefillChunk = 256,
    prefix_cache_mb: common.PrefixCacheMb = DEFAULT_PREFIX_CACHE_MB,
    threads: common.Threads = None,
    served_model_name: common.ServedModelName = None,
) -> None:
    """Run a JSONL file of chat/completion requests with continuous batching; results to --output."""
    from looplm.server import served_model_name as name_for
    from looplm.server.offline import plan_batch, run_batch

    common.check_engine_options(max_context, max_batch, prefill_chunk, prefix_cache_mb)
    if max_tokens is not None and max_tokens < 1:
        raise LooplmError(f"--max-tokens must be a positive integer, got {max_tokens}")
    plan = plan_batch(input_file, output, max_tokens, "--output")  # the files are checked before the model loads
    if not plan.todo:
        common.stderr().print(f"all {len(plan.requests)} requests are already in {output}; nothing to run")
        return
    common.set_threads(threads)
    lm = common.load_model(model, dtype, device, steps, quant, group_size, needs_text=True)
    try:
        summary = _with_progress(lambda progress: run_batch(
            lm, plan, served_model_name or name_for(model), max_context, max_batch, prefill_chunk, prefix_cache_mb,
            progress))
    except KeyboardInterrupt:
        common.stderr().print(f"interrupted: the finished requests are in {output}; run the same command again to "
                              "run the rest")
        raise
    kept = f", {summary.skipped} kept from an earlier run" if summary.skipped else ""
    rate = summary.completion_tokens / summary.seconds if summary.seconds else 0.0
    requests = "request" if summary.succeeded == 1 else "requests"
    common.stderr().print(
        f"{summary.succeeded} {requests} done in {summary.seconds:.1f} s{kept} | {summary.prompt_tokens} prompt "
        f"tokens, {summary.completion_tokens} completion tokens ({rate:.1f} tok/s) | results in {output}")
    if summary.failed:
        shown = ", ".join(summary.failed_ids[:5]) + (", ..." if summary.failed > 5 else "")
        raise LooplmError(f"{summary.failed} of {summary.total} requests failed ({shown}); their errors are in "
                          f"{output}, and running the same command again retries them")


def _with_progress(work):  # noqa: ANN001, ANN202
    """`work(progress)` under a progress bar on stderr: `progress(total, done)` starts it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=common.stderr(), transient=False) as bar:
        def start(total: int, done: int):  # noqa: ANN202
            handle = bar.add_task("requests", total=total, completed=done)
            return lambda finished: bar.advance(handle, finished)

        return work(start)
