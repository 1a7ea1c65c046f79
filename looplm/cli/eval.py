"""`looplm eval TASK`: evaluation tasks (for now the held-out arithmetic task) -> results JSON."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from looplm.cli import common
from looplm.errors import LooplmError

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
    steps: Annotated[str, typer.Option(help="Loop counts to evaluate, comma-separated.")] = "1,2,3,4",
    exit_threshold: common.ExitThreshold = None,
    n: Annotated[int, typer.Option("--n", help="Held-out problems.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed that picks the held-out problems.")] = 1234,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results JSON here.")] = None,
) -> None:
    """Exact-match accuracy on held-out a+b / a-b problems, per loop count (default: read the last loop)."""
    from looplm.eval.arithmetic import evaluate_arithmetic, format_table

    step_list = parse_steps(steps)
    if n < 1:
        raise LooplmError(f"--n must be at least 1, got {n}")
    if exit_threshold is not None and not 0.0 < exit_threshold <= 1.0:
        raise LooplmError(f"--exit-threshold must be in (0, 1], got {exit_threshold}")
    lm = common.load_model(model, dtype, device, None)
    results = evaluate_arithmetic(lm, step_list, n=n, seed=seed, exit_threshold=exit_threshold)
    common.stdout().print(format_table(results))
    if output is not None:
        output.write_text(json.dumps(results, indent=2) + "\n")
