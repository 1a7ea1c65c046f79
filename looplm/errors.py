"""Typed errors raised by the library.

The CLI turns any ``LooplmError`` into one line on stderr and a non-zero exit; the server
turns it into an HTTP 4xx. Messages name the bad input and, where there is one, the fix.
"""

import sys
from collections.abc import Callable


class LooplmError(Exception):
    """Base class for every error looplm raises on purpose."""


class ConfigError(LooplmError):
    """config.json (or generation_config.json) is missing, malformed or unsupported."""


class CheckpointError(LooplmError):
    """Weight files are missing, corrupt, truncated or do not match the config."""


class TokenizerError(LooplmError):
    """tokenizer.json / tokenizer_config.json are missing or unusable."""


class HubError(LooplmError):
    """A hub id could not be resolved (offline, not found, no access)."""


class GenerationError(LooplmError):
    """Bad generation arguments: prompt too long, bad sampling values, and so on."""


class QuantizationError(LooplmError):
    """Bad quantization settings (bits, group size) or a quantized checkpoint that does not match."""


def exit_code_of(run: Callable[[], int | None]) -> int:
    """For a `python -m looplm.X` entry point: `run`'s exit code, or 1 after printing a
    `LooplmError` as one `error: ...` line on stderr (the `looplm` command's contract)."""
    try:
        return run() or 0
    except LooplmError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
