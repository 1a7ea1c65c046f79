"""`looplm bench`: the baseline / bf16 / int8 / int4 table (`looplm.bench_compare`); with
`--detail`, the single-configuration decode breakdown (`looplm.bench`); with `--exit`, the
exit-policy / KV-mode benchmark (`looplm.bench_exit`); with `--speculative`, self-speculative
decoding's acceptance and round costs (`looplm.bench_speculative`); with `--device cuda`, the GPU
decode benchmark (`looplm.bench_cuda`: static decode step, CUDA graphs, % of HBM roofline).

Options are passed through to the chosen benchmark's own parser:
`looplm bench [--detail|--exit|--speculative] --help-bench`.
"""

from typing import Annotated

import typer

from looplm.cli import common
from looplm.errors import LooplmError


@common.app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    detail: Annotated[bool, common.option("Run the detailed decode breakdown (bandwidth, GEMV, profile).",
                                          "--detail")] = False,
    exit_bench: Annotated[bool, common.option("Run the exit-policy / KV-mode benchmark instead.", "--exit")] = False,
    speculative: Annotated[bool, common.option("Run the self-speculative decoding benchmark instead.",
                                               "--speculative")] = False,
    help_bench: Annotated[bool, common.option("Show the benchmark's own options.", "--help-bench")] = False,
    device: Annotated[str, common.option("cpu, or cuda for the GPU benchmark (looplm.bench_cuda).",
                                         "--device")] = "cpu",
) -> None:
    """Benchmark random weights with real Ouro shapes: no-cache baseline, bf16, int8, int4 (tables, then JSON)."""
    if exit_bench + detail + speculative > 1:
        raise LooplmError("choose one of --detail, --exit and --speculative")
    if device not in ("cpu", "cuda"):
        raise LooplmError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        from looplm.bench_cuda import main
    elif exit_bench:
        from looplm.bench_exit import main
    elif speculative:
        from looplm.bench_speculative import main
    elif detail:
        from looplm.bench import main
    else:
        from looplm.bench_compare import main
    args = list(ctx.args) + (["--help"] if help_bench else [])
    code = main(args)
    if code:
        raise typer.Exit(code)
