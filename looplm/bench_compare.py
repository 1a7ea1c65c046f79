"""`looplm bench`: the no-cache baseline, bf16, int8 and int4 side by side, in one run.

Every repeat of every row runs in its own fresh interpreter (so its peak RSS is its own) on
the same random checkpoint with a real Ouro shape, and is timed the same way: a random
`prompt_len`-token prompt, then `new_tokens` greedy tokens. Prefill tok/s is the prompt
length over the time to the first token; decode tok/s counts the tokens after the first.

The rows take turns: round r runs repeat r of every row, one after the other. On a shared
machine the memory bandwidth drifts by tens of percent over minutes (and between processes),
so a row timed in one block could land in a fast or a slow stretch; taking turns spreads the
drift over all rows, and each round gives a paired ratio (row / reference, same round),
reported as median [min-max] next to the ratio of medians.

Drift also comes in spells shorter than a round: on a 2-vCPU Zen 4 VM the same int8 model
decoded at 120 ms/token for a minute, then 175, in one process. So after the rounds, one more
child process per shape loads every looplm row (the cached rows on looplm's kernels), prefills
the same prompt into each, and lets them decode in turns of `turn_tokens` tokens; each turn
gives a paired ratio of the rows that ran seconds apart. That table is what the issue's
int8 / int4 speed-up targets are read from.

Rows:
- `no-cache (reference)`: bf16 with torch's ops, every token recomputing the whole sequence,
  which is what the community "fixed" Ouro checkpoint does (it disables the KV cache). Each
  of its tokens costs a full prefill, so it decodes only `baseline_tokens` tokens per repeat.
- `bf16, torch ops`: cached decode with plain torch ops (what a straight port would do).
- `bf16`: looplm's default path (its C++ CPU kernels, `looplm.kernels`).
- `int8`, `int4`: the layer projections quantized (`looplm.quant`); with looplm's kernels their
  decode runs integer dot products on activations quantized to int8 per block of 32.

The roofline is the read bandwidth measured inside each row's process just before it is
timed (`torch.sum` over a 512 MiB buffer, same thread count; on a shared machine the load
moves between rows) divided by the bytes one decoded token must read: the
layer weights (quantized bytes, scales included) once per UT step, the final norm and gate
per step, lm_head once, and the KV cache at the mean context length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from looplm.bench import (
    BUSY_OTHER_CORES,
    CpuMeter,
    _spread,
    bench_home,
    emit_json,
    ensure_checkpoint,
    machine_info,
    measure_read_bandwidth,
)
from looplm.errors import ConfigError, LooplmError, exit_code_of
from looplm.output_files import check_writable


@dataclass(frozen=True)
class Variant:
    name: str
    quant: str | None = None
    group_size: int = 128
    kernels: str = "auto"
    use_cache: bool = True


VARIANTS = {
    "no-cache": Variant("no-cache (reference)", kernels="torch", use_cache=False),
    "bf16-torch": Variant("bf16, torch ops", kernels="torch"),
    "bf16": Variant("bf16 (looplm)"),
    "int8": Variant("int8", quant="int8"),
    "int4": Variant("int4", quant="int4"),
}
DEFAULT_ROWS = {
    "1.4b": ("no-cache", "bf16-torch", "bf16", "int8", "int4"),
    "2.6b": ("int8", "int4"),
    "tiny": ("no-cache", "bf16-torch", "bf16", "int8"),  # its 176-wide MLP fits no int4 group size
}


@dataclass
class CompareOptions:
    shapes: tuple[str, ...] = ("1.4b", "2.6b")
    prompt_len: int = 512
    new_tokens: int = 64
    baseline_tokens: int = 3
    repeats: int = 3
    threads: int | None = None
    rows: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ROWS))
    workdir: str | None = None
    json_out: str | None = None
    seed: int = 0
    group_size: int = 128  # int4 rows
    emulate_avx2: bool = False
    turn_tokens: int = 4  # tokens per row per turn in the interleaved decode; 0 skips it

    def check(self) -> None:
        for name in ("prompt_len", "new_tokens", "baseline_tokens", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.new_tokens < 2 or self.baseline_tokens < 2:
            raise ConfigError("--new-tokens and --baseline-tokens must be at least 2 (decode rate needs 2 tokens)")
        if not isinstance(self.turn_tokens, int) or self.turn_tokens < 0:
            raise ConfigError(f"--turn-tokens must be 0 (skip) or a positive integer, got {self.turn_tokens!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {self.threads!r}")
        if not self.shapes:  # it measured the memory bandwidth, then printed an empty table
            raise ConfigError("--shapes names no shape (choose from " + ", ".join(self.rows) + ")")
        for shape in self.shapes:
            if shape not in self.rows:
                raise ConfigError(f"unknown shape '{shape}' (choose {', '.join(self.rows)})")
            unknown = [row for row in self.rows[shape] if row not in VARIANTS]
            if unknown:
                raise ConfigError(f"unknown row(s) {', '.join(unknown)} (choose {', '.join(VARIANTS)})")
            if any(VARIANTS[row].quant == "int4" for row in self.rows[shape]):
                self._check_group_size(shape)

    def _check_group_size(self, shape: str) -> None:
        """The int4 group size against the shape's layer widths, before any row runs (the int4 rows
        failed after every other row had been measured)."""
        from looplm.bench import SHAPES
        from looplm.quant import QuantSpec

        try:
            QuantSpec(4, self.group_size)
        except LooplmError as exc:
            raise ConfigError(f"--group-size: {exc}") from None
        widths = (SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"])
        if any(width % self.group_size for width in widths):
            raise ConfigError(f"--group-size {self.group_size} does not divide the {shape} shape's layer widths "
                              f"{widths[0]} and {widths[1]}")


# ---------------------------------------------------------------------------------------------
# One row, in a child process


def decode_bytes(model, context: float) -> dict:  # noqa: ANN001 - OuroForCausalLM
    """Bytes one decoded token reads at batch 1: weights as stored (params and quantized
    buffers), layers and the per-step tail once per UT step, lm_head once, plus the KV cache."""
    config = model.config
    steps = config.total_ut_steps

    def stored(prefix: str) -> int:
        tensors = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()] if n.startswith(prefix)}
        return sum(t.nbytes for t in tensors.values())

    layers = stored("model.layers.")
    tail = stored("model.norm.") + stored("model.early_exit_gate.")
    lm_head = stored("lm_head.") or model.model.embed_tokens.weight.nbytes  # tied: the embedding matrix
    kv_per_token = 2 * config.num_kv_slots * config.num_key_value_heads * config.head_dim * model.dtype.itemsize
    weights = layers * steps + tail * steps + lm_head
    return {"layer_bytes": layers, "weight_bytes_per_token": weights, "kv_bytes_per_token": kv_per_token,
            "kv_read_bytes": kv_per_token * context, "bytes_per_token": weights + kv_per_token * context}


def run_row(spec: dict) -> dict:
    """Load one variant and time it; runs inside the child interpreter."""
    import looplm
    from looplm.generate import stream_generate

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    variant = Variant(**spec["variant"])
    meter = CpuMeter()
    start = time.perf_counter()
    model = looplm.load(spec["path"], dtype="bfloat16", quant=variant.quant, group_size=variant.group_size,
                        kernels=variant.kernels)
    load_seconds = time.perf_counter() - start
    tokens = spec["new_tokens"] if variant.use_cache else spec["baseline_tokens"]
    vocab = model.config.vocab_size
    # Bandwidth in this process, just before timing: on a shared machine the load moves
    # between rows, so each row's roofline uses what the memory delivered to it.
    bandwidth = measure_read_bandwidth(512, meter, repeats=5)
    samples = []
    with torch.inference_mode():
        for _ in stream_generate(model, torch.randint(0, vocab, (1, 16)), 3, eos_token_ids=[]):
            pass  # warm up allocators and kernels
        for repeat in range(spec["repeats"]):
            generator = torch.Generator().manual_seed(spec["seed"] + repeat)
            prompt = torch.randint(0, vocab, (1, spec["prompt_len"]), generator=generator)
            begin = meter.mark()
            marks = [mark for mark in _token_marks(stream_generate, model, prompt, tokens, variant.use_cache, meter)]
            prefill_s = marks[0][0] - begin[0]
            decode_s = marks[-1][0] - marks[0][0]
            samples.append({"prefill_tok_s": spec["prompt_len"] / prefill_s, "decode_tok_s": (tokens - 1) / decode_s,
                            "other_cores": CpuMeter.other_cores(begin, marks[-1])})
    context = spec["prompt_len"] + tokens / 2
    return {"variant": asdict(variant), "load_seconds": load_seconds, "samples": samples, "tokens": tokens,
            "bandwidth_gb_s": bandwidth["gb_s"]["median"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kernels": getattr(model, "kernels", None), **decode_bytes(model, context)}


def _token_marks(stream_generate, model, prompt, tokens, use_cache, meter):  # noqa: ANN001, ANN202
    for _ in stream_generate(model, prompt, tokens, eos_token_ids=[], use_cache=use_cache):
        yield meter.mark()


def run_turns(spec: dict) -> dict:
    """Decode with several models in one process, taking turns; runs inside a child interpreter.

    Every model prefills the same prompt, then each turn pulls `turn_tokens` tokens from every
    model's own generator in order, so the models' times within a turn are seconds apart."""
    import looplm
    from looplm.generate import stream_generate

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    variants = [Variant(**variant) for variant in spec["variants"]]
    models = [looplm.load(spec["path"], dtype="bfloat16", quant=variant.quant, group_size=variant.group_size,
                          kernels=variant.kernels) for variant in variants]
    vocab = models[0].config.vocab_size
    prompt = torch.randint(0, vocab, (1, spec["prompt_len"]), generator=torch.Generator().manual_seed(spec["seed"]))
    turn, turns = spec["turn_tokens"], (spec["new_tokens"] - 1) // spec["turn_tokens"]
    ms_per_token: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:  # warm up allocators and kernels, as the rows do
            for _ in stream_generate(model, torch.randint(0, vocab, (1, 16)), 3, eos_token_ids=[]):
                pass
        streams = [stream_generate(model, prompt, 1 + turns * turn, eos_token_ids=[]) for model in models]
        for stream in streams:
            next(stream)  # the prefill and the first token
        for _ in range(turns):
            for index, stream in enumerate(streams):
                start = time.perf_counter()
                for _ in range(turn):
                    next(stream)
                ms_per_token[index].append((time.perf_counter() - start) / turn * 1e3)
    return {"variants": [asdict(variant) for variant in variants], "turns": turns, "turn_tokens": turn,
            "ms_per_token": ms_per_token}


def run_in_child(flag: str, spec: dict, emulate_avx2: bool = False) -> dict:
    """`run_row` (flag --child) or `run_turns` (--child-turns) in a fresh interpreter."""
    env = {**os.environ, **(EMULATE_AVX2_ENV if emulate_avx2 else {})}
    proc = subprocess.run([sys.executable, "-m", "looplm.bench_compare", flag, json.dumps(spec)],
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        what = spec["variant"]["name"] if "variant" in spec else "the rows taking turns"
        raise LooplmError(f"bench {what} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# What an AVX2-only CPU would run, on an AVX-512 one: looplm's AVX2 kernels and prefill route,
# oneDNN and ATen limited to AVX2 (so torch's bf16 GEMM takes its slow AVX2 path too).
EMULATE_AVX2_ENV = {"LOOPLM_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


# ---------------------------------------------------------------------------------------------
# The driver


def run_compare(options: CompareOptions, log=None) -> dict:  # noqa: ANN001 - log: Callable[[str], None]
    options.check()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if options.threads:
        torch.set_num_threads(options.threads)
    workdir = Path(options.workdir).expanduser() if options.workdir else bench_home()
    meter = CpuMeter()
    result: dict = {"options": asdict(options), "machine": machine_info(),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shapes": {}}
    log("bandwidth: torch.sum over 1 GiB")
    result["bandwidth"] = measure_read_bandwidth(1024, meter)
    for shape in options.shapes:
        log(f"checkpoint: {shape} under {workdir}")
        try:
            path, _ = ensure_checkpoint(shape, workdir, options.seed)
        except KeyboardInterrupt:  # the shapes before this one are kept
            result["interrupted"] = {"shape": shape, "during": "checkpoint", "rounds_kept": 0}
            break
        variants = {key: _variant(key, options.group_size) for key in options.rows[shape]}
        rows, failed, rounds_kept = _measure_rows(shape, path, variants, options, log)
        if rows:
            result["shapes"][shape] = rows
        if failed:
            result.setdefault("failed", {})[shape] = failed
        if rounds_kept is not None:
            result["interrupted"] = {"shape": shape, "during": "rounds", "rounds_kept": rounds_kept}
            break
        taking_turns = [key for key, variant in variants.items()
                        if variant.use_cache and variant.kernels == "auto" and key not in failed]
        if options.turn_tokens and len(taking_turns) >= 2 and options.new_tokens > options.turn_tokens:
            log(f"{shape}: {', '.join(variants[key].name for key in taking_turns)} decoding in turns (one process)")
            spec = {"path": str(path), "variants": [asdict(variants[key]) for key in taking_turns],
                    "prompt_len": options.prompt_len, "new_tokens": options.new_tokens,
                    "turn_tokens": options.turn_tokens, "threads": options.threads, "seed": options.seed}
            try:
                turns = run_in_child("--child-turns", spec, options.emulate_avx2)
            except LooplmError as exc:
                log(f"warning: {exc}")
                result.setdefault("failed", {}).setdefault(shape, {})["turns"] = str(exc)
            except KeyboardInterrupt:
                log(f"interrupted: keeping the rows of {shape}, without its turns")
                result["interrupted"] = {"shape": shape, "during": "turns", "rounds_kept": options.repeats}
                break
            else:
                result.setdefault("turns", {})[shape] = _turn_rows(taking_turns, turns)
    return result


def _measure_rows(shape: str, path: Path, variants: dict[str, Variant], options: CompareOptions,
                  log) -> tuple[list[dict], dict[str, str], int | None]:  # noqa: ANN001 - log: Callable
    """Every row's rounds, each in a fresh process: the merged rows, the rows that failed (key ->
    why; left out after their first failure), and on Ctrl-C the number of rounds kept (those every
    row finished), else None."""
    parts: dict[str, list[dict]] = {key: [] for key in variants}
    failed: dict[str, str] = {}
    rounds_kept = None
    try:
        for repeat in range(options.repeats):
            for key, variant in variants.items():
                if key in failed:
                    continue
                log(f"{shape}: {variant.name} (round {repeat + 1}/{options.repeats}, fresh process)")
                spec = {"path": str(path), "variant": asdict(variant), "prompt_len": options.prompt_len,
                        "new_tokens": options.new_tokens, "baseline_tokens": options.baseline_tokens,
                        "repeats": 1, "threads": options.threads, "seed": options.seed + repeat}
                try:
                    parts[key].append(run_in_child("--child", spec, options.emulate_avx2))
                except LooplmError as exc:  # e.g. out of memory: leave the row out, keep the others
                    log(f"warning: {exc}; the row is left out")
                    failed[key] = str(exc)
    except KeyboardInterrupt:
        rounds_kept = min((len(parts[key]) for key in parts if key not in failed), default=0)
        log(f"interrupted: keeping the {rounds_kept} round(s) of {shape} that every row finished")
        parts = {key: row_parts[:rounds_kept] for key, row_parts in parts.items()} if rounds_kept else {}
    rows = [_merge_row(key, row_parts) for key, row_parts in parts.items() if key not in failed]
    _add_ratios(rows)
    return rows, failed, rounds_kept


def _variant(key: str, group_size: int) -> Variant:
    variant = VARIANTS[key]
    return Variant(f"int4 g{group_size}", "int4", group_size) if variant.quant == "int4" else variant


def _merge_row(key: str, parts: list[dict]) -> dict:
    """One row from its rounds (one child process each)."""
    row = dict(parts[0])
    row["key"] = key
    row["samples"] = [sample for part in parts for sample in part["samples"]]
    row["load_seconds"] = _spread([part["load_seconds"] for part in parts])
    row["bandwidth_samples_gb_s"] = [part["bandwidth_gb_s"] for part in parts]
    row["bandwidth_gb_s"] = _spread(row["bandwidth_samples_gb_s"])["median"]
    row["peak_rss_bytes"] = max(part["peak_rss_bytes"] for part in parts)
    row["prefill_tok_s"] = _spread([s["prefill_tok_s"] for s in row["samples"]])
    row["decode_tok_s"] = _spread([s["decode_tok_s"] for s in row["samples"]])
    row["other_cores_max"] = max((s["other_cores"] for s in row["samples"] if s["other_cores"] is not None),
                                 default=None)
    row["roofline_tok_s"] = row["bandwidth_gb_s"] * 1e9 / row["bytes_per_token"]
    row["pct_roofline"] = 100 * row["decode_tok_s"]["median"] / row["roofline_tok_s"]
    return row


def _turn_rows(keys: list[str], turns: dict) -> list[dict]:
    """Per row: ms/token over the turns, and per turn the speed-up over the reference row
    (bf16 when it took part, else the first), median [min-max]."""
    times = dict(zip(keys, turns["ms_per_token"], strict=True))
    reference = "bf16" if "bf16" in times else keys[0]
    names = {key: variant["name"] for key, variant in zip(keys, turns["variants"], strict=True)}
    return [{"key": key, "name": names[key], "reference": names[reference], "turns": turns["turns"],
             "turn_tokens": turns["turn_tokens"], "ms_per_token_by_turn": times[key], "ms_per_token": _spread(times[key]),
             "speedup_paired": _spread([base / mine for base, mine in zip(times[reference], times[key], strict=True)])}
            for key in keys]


def _add_ratios(rows: list[dict]) -> None:
    """Decode and prefill speed relative to the no-cache, bf16 torch-ops and looplm bf16 rows:
    the ratio of medians, and per round the paired ratio (median [min-max] over rounds)."""
    by_key = {row["key"]: row for row in rows}
    for reference in ("no-cache", "bf16-torch", "bf16"):
        base = by_key.get(reference)
        for row in rows:
            for what in ("decode", "prefill"):
                ratio = None if base is None else row[f"{what}_tok_s"]["median"] / base[f"{what}_tok_s"]["median"]
                row[f"{what}_vs_{reference}"] = ratio
                paired = None
                if base is not None:
                    pairs = zip(row["samples"], base["samples"], strict=True)
                    paired = _spread([mine[f"{what}_tok_s"] / theirs[f"{what}_tok_s"] for mine, theirs in pairs])
                row[f"{what}_vs_{reference}_paired"] = paired


def print_report(result: dict, console=None) -> None:  # noqa: ANN001 - rich.console.Console
    from rich.console import Console
    from rich.table import Table

    console = console or (Console() if sys.stdout.isatty() else Console(width=160))
    opts, machine, bw = result["options"], result["machine"], result["bandwidth"]
    if opts.get("emulate_avx2"):
        console.print("[bold]AVX2-only emulation[/bold]: every row ran with " +
                      " ".join(f"{k}={v}" for k, v in EMULATE_AVX2_ENV.items()))
    console.print(f"CPU {machine['cpu_model']} ({machine['logical_cpus']} logical), ISA {machine['cpu_capability']} "
                  f"{' '.join(machine['bf16_isa'])}, torch {machine['torch']} with {machine['torch_threads']} threads; "
                  f"read bandwidth {bw['gb_s']['median']:.1f} GB/s [{bw['gb_s']['min']:.1f}-{bw['gb_s']['max']:.1f}]")
    for shape, rows in result["shapes"].items():
        rounds = rows[0]["load_seconds"]["n"]  # fewer than asked when the run was interrupted
        table = Table(title=f"Ouro {shape} shape, random weights, CPU, batch 1: prompt {opts['prompt_len']}, "
                            f"{opts['new_tokens']} new tokens, median \\[min-max] of {rounds} "
                            f"round{'s' if rounds != 1 else ''} "
                            "(ratios: paired within a round)")
        for name in ("variant", "prefill tok/s", "decode tok/s", "decode x no-cache", "decode x bf16 torch",
                     "decode x bf16 looplm", "prefill x bf16 torch", "GB/token", "row GB/s", "% roofline",
                     "peak RSS GiB", "other load"):
            table.add_column(name, justify="right", overflow="fold")  # a narrow terminal wraps, never cuts
        for row in rows:
            table.add_row(row["variant"]["name"], _fmt(row["prefill_tok_s"], 1), _fmt(row["decode_tok_s"], 2),
                          _paired(row["decode_vs_no-cache_paired"]), _paired(row["decode_vs_bf16-torch_paired"]),
                          _paired(row["decode_vs_bf16_paired"]), _paired(row["prefill_vs_bf16-torch_paired"]),
                          f"{row['bytes_per_token'] / 1e9:.2f}",
                          f"{row['bandwidth_gb_s']:.1f}",
                          f"{row['pct_roofline']:.0f}%", f"{row['peak_rss_bytes'] / (1 << 30):.2f}",
                          "-" if row["other_cores_max"] is None else f"{row['other_cores_max']:.2f}")
        console.print(table)
        if shape in result.get("turns", {}):
            _print_turns(console, result["turns"][shape], shape)
        for key, why in result.get("failed", {}).get(shape, {}).items():
            what = "the rows decoding in turns" if key == "turns" else f"the {VARIANTS[key].name} row"
            console.print(f"[yellow]warning: {shape}: {what} failed and is left out: {why}[/yellow]")
    if "interrupted" in result:
        stopped = result["interrupted"]
        kept = (f"its table holds the {stopped['rounds_kept']} round(s) every row finished"
                if stopped["rounds_kept"] else "none of its rows finished")
        console.print(f"[yellow]interrupted during the {stopped['during']} of {stopped['shape']}: {kept}; the shapes "
                      "after it did not run[/yellow]")
    busy = [f"{shape} {row['variant']['name']}" for shape, rows in result["shapes"].items() for row in rows
            if (row["other_cores_max"] or 0) > BUSY_OTHER_CORES]
    if busy:
        console.print(f"[yellow]warning: other processes kept > {BUSY_OTHER_CORES} cores busy during: "
                      f"{', '.join(busy)}; those rows are pessimistic[/yellow]")


def _print_turns(console, rows: list[dict], shape: str) -> None:  # noqa: ANN001 - rich.console.Console
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"Ouro {shape} shape, decode taking turns in one process after the same prompt: "
                        f"{first['turns']} turns of {first['turn_tokens']} tokens per row, median \\[min-max] "
                        "(speed-up: paired within a turn)")
    for name in ("variant", "ms / token", f"decode x {first['reference']}"):
        table.add_column(name, justify="right", overflow="fold")
    for row in rows:
        digits = 1 if row["ms_per_token"]["median"] >= 10 else 3
        table.add_row(row["name"], _fmt(row["ms_per_token"], digits), _paired(row["speedup_paired"]))
    console.print(table)


def _fmt(spread: dict, digits: int) -> str:
    """Median, and [min-max] when there were several rounds."""
    if spread["n"] == 1:
        return f"{spread['median']:.{digits}f}"
    return f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}-{spread['max']:.{digits}f}]"


def _paired(spread: dict | None) -> str:
    """A per-round ratio: median, and [min-max] when there were several rounds."""
    if spread is None:
        return "-"
    if spread["n"] == 1:
        return f"{spread['median']:.2f}x"
    return f"{spread['median']:.2f}x [{spread['min']:.2f}-{spread['max']:.2f}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="looplm bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.4b,2.6b", help="comma-separated: tiny, 1.4b, 2.6b")
    parser.add_argument("--rows-1.4b", dest="rows_14", default=",".join(DEFAULT_ROWS["1.4b"]))
    parser.add_argument("--rows-2.6b", dest="rows_26", default=",".join(DEFAULT_ROWS["2.6b"]))
    parser.add_argument("--rows-tiny", dest="rows_tiny", default=",".join(DEFAULT_ROWS["tiny"]))
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--baseline-tokens", type=int, default=3, help="tokens per repeat for the no-cache row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads, here and in every row")
    parser.add_argument("--workdir", default=None, help="where the random checkpoints live")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="run every row as an AVX2-only CPU would (oneDNN, ATen and looplm limited to AVX2)")
    parser.add_argument("--turn-tokens", type=int, default=4,
                        help="after the rounds, the looplm rows decode in turns of this many tokens in one process "
                             "(paired speed-ups); 0 skips it")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-turns", default=None, help=argparse.SUPPRESS)
    return parser


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child is not None or args.child_turns is not None:
        run, spec = (run_row, args.child) if args.child is not None else (run_turns, args.child_turns)
        try:
            print(json.dumps(run(json.loads(spec))), flush=True)
        except LooplmError as exc:  # the parent shows the last stderr line: the message, not a traceback
            print(exc, file=sys.stderr)
            return 1
        return 0
    options = CompareOptions(
        shapes=_split(args.shapes), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        baseline_tokens=args.baseline_tokens, repeats=args.repeats, threads=args.threads,
        rows={"1.4b": _split(args.rows_14), "2.6b": _split(args.rows_26), "tiny": _split(args.rows_tiny)},
        workdir=args.workdir, json_out=args.json_out, seed=args.seed, group_size=args.group_size,
        emulate_avx2=args.emulate_avx2, turn_tokens=args.turn_tokens)
    try:
        check_writable(options.json_out, "--json-out")
        result = run_compare(options)
    except LooplmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before any row finished: nothing to print
        print("interrupted before any row finished", file=sys.stderr)
        return 130
    print_report(result)
    code = exit_code_of(lambda: emit_json(result, options.json_out))
    if "interrupted" in result:
        print("interrupted: the table holds the rounds that finished", file=sys.stderr)
        return 130
    if result.get("failed"):
        print("error: part of the benchmark failed (warnings above); the table holds what ran", file=sys.stderr)
        return code or 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
