"""`looplm bench`: the decode benchmark (`looplm.bench`) and, with `--exit`, the exit/KV one.

Options are passed through to the benchmark's own parser: `looplm bench --help-bench`.
"""

from typing import Annotated

import typer

from looplm.cli import common


@common.app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    exit_bench: Annotated[bool, common.option("Run the exit-policy / KV-mode benchmark instead.", "--exit")] = False,
    help_bench: Annotated[bool, common.option("Show the benchmark's own options.", "--help-bench")] = False,
) -> None:
    """Benchmark random weights with a real Ouro shape (default 1.4B): tables, then one JSON line."""
    if exit_bench:
        from looplm.bench_exit import main
    else:
        from looplm.bench import main
    args = list(ctx.args) + (["--help"] if help_bench else [])
    code = main(args)
    if code:
        raise typer.Exit(code)
