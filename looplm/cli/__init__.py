"""The `looplm` command line: one typer app (`common.app`), one short module per command."""

import sys
from typing import Annotated

import typer

from looplm.cli import batch, bench, chat, eval, generate, inspect, quantize, serve, train  # noqa: F401 - importing registers each command
from looplm.cli.common import app, exit_on_output_error, is_output_error

__all__ = ["app", "main"]


def _print_version(value: bool) -> None:
    if value:
        from looplm import __version__

        print(f"looplm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Run looped language models (ByteDance Ouro) in pure PyTorch."""


def main() -> None:
    try:
        try:
            app()
        finally:  # output still buffered is written here, where a failure is caught below
            if sys.stdout is not None:
                sys.stdout.flush()
    except OSError as exc:  # stdout or stderr could not be written (a full disk)
        if not is_output_error(exc):
            raise
        exit_on_output_error(exc)
