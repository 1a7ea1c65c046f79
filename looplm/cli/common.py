"""The typer app, the options every command shares, model loading and error handling.

Error contract: a `LooplmError` (bad input, bad files) is one line on stderr, "error: ...",
and exit code 1; Ctrl-C exits 130 without a message; output that cannot be written (stdout on a
full disk) is one line and exit code 1 (`looplm.cli.main`), a closed pipe (`| head`) exit code 1
without a message; any other exception is a bug and keeps its full traceback (typer's pretty
exceptions are off).
"""

import contextlib
import errno
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from looplm.errors import LooplmError

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130
# How writing stdout or stderr fails on a full disk, a file-size limit or a failing device: one line,
# exit 1. A closed pipe (EPIPE, `looplm generate ... | head`) click already ends quietly with exit 1.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def check_text(text: str, what: str) -> None:
    """A LooplmError naming the first bad character of `text` that is not Unicode text. Python hands
    over bytes that are not UTF-8 (in arguments, and on stdin after `read_stdin_leniently`) as lone
    surrogates U+DC80..U+DCFF, which name the byte. Such text is refused, not decoded with U+FFFD in
    place of the bytes: the model would answer a prompt other than the one written, and a file in
    another encoding would lose every accented letter without a word."""
    from looplm.tokenizer import first_lone_surrogate

    index = first_lone_surrogate(text)
    if index is None:
        return
    char = text[index]
    if "\udc80" <= char <= "\udcff":
        raise LooplmError(f"{what} is not valid UTF-8: byte 0x{ord(char) - 0xDC00:02x} at character {index}; "
                          "convert it to UTF-8 first (e.g. iconv -f latin1 -t utf-8)")
    raise LooplmError(f"{what} is not valid Unicode: a lone surrogate {char!r} at character {index}")


def read_stdin_leniently() -> None:
    """Decode stdin's bytes that are not UTF-8 as arguments are decoded (to lone surrogates, which
    `check_text` then names), where a UTF-8 locale other than C's raised UnicodeDecodeError in the
    middle of reading (a traceback, and the lines after it lost)."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def stderr() -> Console:
    # Built per call: the console then writes to whatever sys.stderr is now (CliRunner swaps it).
    return Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


def stdout() -> Console:
    return Console(markup=False, highlight=False, soft_wrap=True)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"warning: {one_line(message)}", file=sys.stderr)


def is_output_error(exc: OSError) -> bool:
    """Whether `exc` is stdout or stderr failing to take a write: file errors name their file, and
    the library turns them into LooplmErrors (an OSError that names a file stays a bug, with its traceback)."""
    return exc.filename is None and exc.errno in OUTPUT_ERRNOS


def exit_on_output_error(exc: OSError) -> NoReturn:
    """End the command after its output could not be written: one `error:` line where stderr still
    takes it, then exit 1, with both streams sent to /dev/null so Python's own flush at exit cannot
    fail again (which printed "Exception ignored" and exited 120)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"error: cannot write the output ({exc.strerror or exc})", file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed, or not a real file
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
    raise SystemExit(EXIT_ERROR)


class LooplmGroup(TyperGroup):
    """Runs every subcommand under the error contract above."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line  # library warnings as one line too
                return super().invoke(ctx)
        except LooplmError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    cls=LooplmGroup,
    help="Run looped language models (ByteDance Ouro) in pure PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# -- options shared by every command that loads a model ---------------------------------------


def option(help: str, *names: str, default_in_help: bool = False):  # noqa: A002, ANN201
    """A typer option whose help text states its default itself when `default_in_help`."""
    return typer.Option(*names, help=help, show_default=not default_in_help)


Model = Annotated[Optional[str], option(
    "Model directory, hub id (owner/name) or .gguf file (default: the embedded tiny-ouro model).",
    "--model", "-m", default_in_help=True,
)]
Dtype = Annotated[str, option("Weight dtype: bfloat16, float16 or float32.")]
Device = Annotated[str, option("cpu, cuda, cuda:N, or auto (cuda when available).")]
Steps = Annotated[Optional[int], option(
    "Recurrent (UT) steps per token, 1-8, or up to the config's own count if higher (default: the config's).",
    default_in_help=True
)]
Quant = Annotated[Optional[str], option(
    "Weight-only quantization of the layer projections while loading: int8 or int4 (default: none; a "
    "checkpoint written by `looplm quantize` loads quantized without it).", "--quant", default_in_help=True,
)]
GroupSize = Annotated[Optional[int], option(
    "With --quant int4: input columns per scale, 32, 64, 128 (the default) or 256.", "--group-size",
    default_in_help=True)]

# -- sampling options shared by generate and chat ----------------------------------------------

MaxNewTokens = Annotated[int, option("Most new tokens per reply.")]
Temperature = Annotated[Optional[float], option(
    "0 = greedy (default: the model's generation config, else 0).", default_in_help=True
)]
TopP = Annotated[Optional[float], option(
    "Nucleus sampling mass (default: the model's, else 1.0).", default_in_help=True
)]
TopK = Annotated[Optional[int], option(
    "Sample among the k likeliest tokens, 0 = all (default: the model's, else 0).", default_in_help=True
)]
ExitThreshold = Annotated[Optional[float], option(
    "Exit at the first UT step whose cumulative exit probability reaches this, in (0, 1] (default: the config's).",
    default_in_help=True,
)]
Seed = Annotated[Optional[int], option("Random seed for sampling (reproducible output).", default_in_help=True)]
Threads = Annotated[Optional[int], option(
    "Torch CPU threads (default: one per core, less the cores other processes keep busy when the command "
    "starts). Fewer leave cores to other work.", default_in_help=True
)]
PresencePenalty = Annotated[float, option(
    "Subtract this, in [-2, 2], from the logit of every token already generated (OpenAI's presence_penalty)."
)]
FrequencyPenalty = Annotated[float, option(
    "Subtract this, in [-2, 2], times its count so far from each generated token's logit (frequency_penalty)."
)]
RepetitionPenalty = Annotated[Optional[float], option(
    "HF's repetition penalty over prompt and output, e.g. 1.1; 1 = off (default: the model's, else 1).",
    default_in_help=True,
)]
MinP = Annotated[Optional[float], option(
    "Sample only tokens with at least MIN_P x the likeliest one's probability (default: the model's, else 0).",
    default_in_help=True,
)]
Stop = Annotated[Optional[list[str]], option(
    "Stop string (repeatable); it is not printed.", "--stop", default_in_help=True
)]


ExitPolicyName = Annotated[Optional[str], option(
    "Exit policy: last, gate, confidence, kl, fixed, weighted (default: the reference's gate rule at the "
    "config's threshold).", "--exit-policy", default_in_help=True,
)]
KvMode = Annotated[str, option("KV cache: full (one entry per step and layer) or shared (one per layer for "
                               "decoded tokens; 1/steps of the memory).", "--kv-mode")]
SkipCompute = Annotated[bool, option("Stop computing a token's loops once it exits (saves compute).",
                                     "--skip-compute/--no-skip-compute")]


Decoder = Annotated[str, option(
    "Decode step: auto (the CUDA-graph static step on a GPU when --kv-mode is full and without "
    "--skip-compute, else dynamic), dynamic (takes every option), or a static step: eager, compile, graph "
    "(CUDA), compile+graph (CUDA); the static step runs every loop with the full KV cache.", "--decoder",
)]


DraftSteps = Annotated[Optional[int], option(
    "Self-speculative decoding: draft tokens with this many loops (1 to steps-1; try half), then verify them "
    "with the remaining loops in one pass; greedy output is unchanged, sampling keeps its distribution. Pays off "
    "only when most drafts are accepted (docs/speculative.md).", "--draft-steps",
    default_in_help=True,
)]
DraftTokens = Annotated[Optional[int], option(
    "Tokens drafted per speculative round, at most (with --draft-steps; default 2).", "--draft-tokens",
    default_in_help=True)]
DraftConfidence = Annotated[Optional[float], option(
    "End a speculative round's drafting at the first draft the draft gives less than this probability "
    "(with --draft-steps; default 0: always draft --draft-tokens).", "--draft-confidence", default_in_help=True)]

# -- the serving engine's options (`looplm serve` and `looplm batch`) ------------------------------

MaxContext = Annotated[int, option("Prompt + max_tokens limit per request (capped at the model's context).")]
MaxBatch = Annotated[int, option("Most sequences decoding at once (all batches together).")]
PrefillChunk = Annotated[int, option(
    "Prompt positions per prefill pass while others decode: longer prompts are prefilled in chunks, so "
    "running requests wait at most one chunk between tokens.")]
PrefixCacheMb = Annotated[int, option(
    "MiB of finished requests' K/V kept for prompts that start the same way (a chat's next turn, a shared "
    "system prompt), so only the rest is prefilled; 0 turns it off.")]
ServedModelName = Annotated[Optional[str], option(
    "Model id the replies carry, which server requests may also name (default: the model's directory name, or "
    "looplm-default).", default_in_help=True)]


def check_engine_options(max_context: int, max_batch: int, prefill_chunk: int, prefix_cache_mb: int) -> None:
    """The engine options' bounds, checked before the model loads."""
    for value, flag in ((max_context, "--max-context"), (max_batch, "--max-batch"), (prefill_chunk, "--prefill-chunk")):
        if value < 1:
            raise LooplmError(f"{flag} must be a positive integer, got {value}")
    if prefix_cache_mb < 0:
        raise LooplmError(f"--prefix-cache-mb must be 0 or more, got {prefix_cache_mb}")


@dataclass(frozen=True)
class DecodeOptions:
    """How tokens are decoded: the exit rule, the KV cache layout, compute skipping, the decode step
    and self-speculative drafting."""

    exit_policy: Optional[str]
    kv_mode: str
    skip_compute: bool
    decoder: str = "auto"
    draft_steps: Optional[int] = None
    draft_tokens: Optional[int] = None  # None: 2 (given without draft_steps: an error, not ignored)
    draft_confidence: Optional[float] = None  # None: 0.0

    def __post_init__(self) -> None:
        from looplm.errors import GenerationError

        if self.draft_steps is None and (self.draft_tokens is not None or self.draft_confidence is not None):
            raise GenerationError("--draft-tokens and --draft-confidence shape speculative rounds: give --draft-steps "
                                  "too, or leave them out")
        object.__setattr__(self, "draft_tokens", 2 if self.draft_tokens is None else self.draft_tokens)
        object.__setattr__(self, "draft_confidence", 0.0 if self.draft_confidence is None else self.draft_confidence)
        from looplm.exit import POLICY_NAMES
        from looplm.generate import DECODERS, KV_MODES

        if self.exit_policy is not None and self.exit_policy not in POLICY_NAMES:
            raise GenerationError(f"--exit-policy must be one of {', '.join(POLICY_NAMES)}, got '{self.exit_policy}'")
        if self.kv_mode not in KV_MODES:
            raise GenerationError(f"--kv-mode must be one of {', '.join(KV_MODES)}, got '{self.kv_mode}'")
        if self.decoder not in DECODERS:
            raise GenerationError(f"--decoder must be one of {', '.join(DECODERS)}, got '{self.decoder}'")
        if self.draft_steps is not None and self.draft_steps < 1:
            raise GenerationError(f"--draft-steps must be at least 1, got {self.draft_steps}")
        if not 1 <= self.draft_tokens <= 64:
            raise GenerationError(f"--draft-tokens must be from 1 to 64, got {self.draft_tokens}")
        if not 0.0 <= self.draft_confidence < 1.0:
            raise GenerationError(f"--draft-confidence must be in [0, 1), got {self.draft_confidence}")

    def check_threshold(self, exit_threshold: float | None) -> None:
        """--exit-threshold against --exit-policy, before the model loads (the library checks again)."""
        from looplm.errors import GenerationError
        from looplm.exit import check_exit_options

        try:
            check_exit_options(self.exit_policy, exit_threshold)
        except GenerationError as exc:
            raise GenerationError(f"--exit-threshold {exit_threshold:g}: {exc}") from None

    def as_kwargs(self) -> dict:
        return {"exit_policy": self.exit_policy, "kv_mode": self.kv_mode, "skip_compute": self.skip_compute,
                "decoder": self.decoder, "draft_steps": self.draft_steps, "draft_tokens": self.draft_tokens,
                "draft_confidence": self.draft_confidence}


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    temperature: Optional[float]
    top_p: Optional[float]
    top_k: Optional[int]
    exit_threshold: Optional[float]
    seed: Optional[int]
    stop: Optional[list[str]]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: Optional[float] = None
    min_p: Optional[float] = None

    def __post_init__(self) -> None:
        # Fail before loading a model, which can take a while; the library checks again.
        from looplm.errors import GenerationError
        from looplm.sampling import SamplingParams

        if self.max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        for stop in self.stop or []:
            check_text(stop, "--stop")
        SamplingParams(self.temperature or 0.0, 1.0 if self.top_p is None else self.top_p, self.top_k or 0,
                       self.presence_penalty, self.frequency_penalty, (),
                       1.0 if self.repetition_penalty is None else self.repetition_penalty, self.min_p or 0.0)

    def for_model(self, model) -> dict:  # noqa: ANN001
        """`stream_text` keyword arguments; unset sampling values come from the model's generation config."""
        defaults = getattr(model, "generation_defaults", {}) or {}

        def pick(value, key: str, fallback):  # noqa: ANN001, ANN202
            return value if value is not None else defaults.get(key, fallback)

        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": pick(self.temperature, "temperature", 0.0),
            "top_p": pick(self.top_p, "top_p", 1.0),
            "top_k": pick(self.top_k, "top_k", 0),
            "exit_threshold": self.exit_threshold,
            "seed": self.seed,
            "stop": list(self.stop or []),
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": pick(self.repetition_penalty, "repetition_penalty", 1.0),
            "min_p": pick(self.min_p, "min_p", 0.0),
        }


def kv_bytes(model, kv_mode: str) -> int:  # noqa: ANN001
    """KV-cache bytes per decoded token of a loaded model in the given mode."""
    from looplm.cache import kv_bytes_per_token

    config = model.config
    return kv_bytes_per_token(config.total_ut_steps, config.num_hidden_layers, config.num_key_value_heads,
                              config.head_dim, model.lm_head.weight.element_size(), kv_mode)


def set_threads(threads: Optional[int]) -> None:
    """Apply `--threads` (checked) before any work. Without it (and without OMP_NUM_THREADS), leave
    alone the cores other processes keep busy (`looplm.cpu_load`), saying so on a terminal, and
    let long runs follow the load as it changes."""
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise LooplmError(f"--threads must be a positive integer, got {threads}")
    import torch

    if threads is not None:
        from looplm.cpu_load import allowed_cpus

        cpus = allowed_cpus()
        if cpus is not None and threads > len(cpus):  # oversubscribed threads wait on each other at every op
            stderr().print(f"warning: --threads {threads} is more than the {len(cpus)} CPUs this process may use; "
                           "every op will wait on the extra threads", style="yellow")
        torch.set_num_threads(threads)
        return
    from looplm.cpu_load import use_free_cores

    choice = use_free_cores()
    if choice is not None and choice.threads is not None and sys.stderr.isatty():
        stderr().print(f"(other processes keep {choice.busy_cores:.1f} cores busy: using {choice.threads} of "
                       f"{choice.default} threads, since waiting on a busy core slows every op; --threads N sets it)",
                       style="dim")


def load_model(  # noqa: ANN201
    model: Optional[str], dtype: str, device: str, steps: Optional[int], quant: Optional[str] = None,
    group_size: Optional[int] = None, needs_text: bool = False,
):
    """`looplm.load` with a spinner on an interactive stderr (`device` may be 'auto').
    `needs_text`: the command reads or writes text, so a model directory without a tokenizer is
    refused before its weights are read (seconds to minutes for a real checkpoint)."""
    from looplm import load

    if group_size is not None and quant != "int4":  # it was ignored in silence
        raise LooplmError("--group-size applies with --quant int4 (int8 has one scale per output channel)")
    if needs_text and model is not None:
        path = Path(model).expanduser()
        if path.is_dir() and not (path / "tokenizer.json").exists():
            from looplm.config import OuroConfig

            OuroConfig.from_file(path / "config.json")  # a missing or broken config is the first thing to fix
            raise LooplmError(f"{path} has no tokenizer.json, so this command cannot take text; copy the model's "
                              "tokenizer.json (and tokenizer_config.json) into it")
    options = {"dtype": dtype, "device": device, "steps": steps, "quant": quant, "group_size": group_size or 128}
    console = stderr()
    if not console.is_terminal:
        return load(model, **options)
    with console.status(f"loading {model or 'the default model'}", spinner="dots"):
        return load(model, **options)
