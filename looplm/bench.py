"""Decode benchmark on random weights with real Ouro shapes: one run, ratios side by side.

What one run measures (see docs/benchmarks.md for how to read it):
- a summary card: CPU, ISA, threads, params, weight bytes, KV bytes per token, and the bytes a
  decoded token must read (layer weights x UT steps + final norm/gate x steps + lm_head once;
  the embedding row is negligible);
- `looplm.load` time and peak RSS, in a fresh subprocess, and peak RSS / weight bytes;
- memory read bandwidth (`torch.sum` over a buffer far larger than the caches) and the bf16
  GEMV bandwidth of the model's own linears at M=1 (decode is GEMV bound);
- prefill tok/s at batch 1, decode tok/s per batch size (median and min-max over repeats after
  a warmup), and decode as a % of the bandwidth roofline;
- optionally the no-cache recompute baseline (`--baseline`) and an op profile (`--profile`).

Every timed phase also records how many CPU cores OTHER processes kept busy meanwhile
("other load"): on a shared 2-core machine one busy neighbour slows OpenMP decode severalfold,
so a number measured under load is flagged rather than silently reported.

Rich tables go to stdout, progress to stderr, and the last stdout line is one JSON document.
The random checkpoint is written once, tensor by tensor in bf16 (peak memory: one tensor),
and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from looplm.config import OuroConfig
from looplm.errors import CheckpointError, ConfigError, exit_code_of
from looplm.output_files import PRINTED_ABOVE, check_writable, write_result

CHECKPOINT_VERSION = "v1"
_OURO_COMMON = {
    "architectures": ["OuroForCausalLM"],
    "model_type": "ouro",
    "hidden_act": "silu",
    "max_position_embeddings": 65536,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "total_ut_steps": 4,
    "early_exit_threshold": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}
_OURO_1_4B = {"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
              "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128}
SHAPES: dict[str, dict] = {
    "tiny": {**_OURO_COMMON, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16},
    "1.4b": {**_OURO_COMMON, **_OURO_1_4B},
    "2.6b": {**_OURO_COMMON, **_OURO_1_4B, "num_hidden_layers": 48},
}
DEFAULT_NEW_TOKENS = {"tiny": 32, "1.4b": 16, "2.6b": 8}  # keeps a default run near 5 minutes on 2 cores
BUSY_OTHER_CORES = 0.25  # above this, a measurement is flagged as taken under contention
MIN_METER_SECONDS = 0.25


@dataclass
class BenchOptions:
    shape: str = "1.4b"
    prompt_len: int = 512
    new_tokens: int | None = None  # None: DEFAULT_NEW_TOKENS[shape]
    repeats: int = 3
    batch_sizes: tuple[int, ...] = (1, 4)
    workdir: str | None = None  # None: $LOOPLM_HOME/bench (default ~/.cache/looplm/bench)
    json_out: str | None = None
    baseline: bool = False
    baseline_prompt_len: int = 32
    baseline_tokens: int = 4
    profile: bool = False
    profile_steps: int = 3
    threads: int | None = None  # None: torch's default
    warmup_steps: int = 2
    bandwidth_mib: int = 1024
    seed: int = 0
    wait_quiet: float = 0.0  # seconds to wait, before starting, for other processes to go idle

    def resolved_new_tokens(self) -> int:
        return self.new_tokens if self.new_tokens is not None else DEFAULT_NEW_TOKENS[self.shape]

    def check(self) -> None:
        if self.shape not in SHAPES:
            raise ConfigError(f"unknown shape '{self.shape}' (choose {', '.join(SHAPES)})")
        positive = {"prompt_len": self.prompt_len, "new_tokens": self.resolved_new_tokens(), "repeats": self.repeats,
                    "baseline_prompt_len": self.baseline_prompt_len, "baseline_tokens": self.baseline_tokens,
                    "profile_steps": self.profile_steps, "bandwidth_mib": self.bandwidth_mib}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"--batch-sizes must be positive integers, got {self.batch_sizes!r}")
        if self.warmup_steps < 0 or self.wait_quiet < 0:
            raise ConfigError("--warmup-steps and --wait-quiet must not be negative")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be a positive integer, got {self.threads!r}")


# ---------------------------------------------------------------------------------------------
# Random checkpoint, written tensor by tensor


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of the model `config` describes (built on the meta device)."""
    from looplm.models.ouro import OuroForCausalLM

    with torch.device("meta"):
        model = OuroForCausalLM(OuroConfig.from_dict(config))
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def write_random_checkpoint_bf16(path: Path, config: dict, seed: int = 0) -> None:
    """Write config.json and a bf16 model.safetensors of N(0, 0.02) weights (norms = 1).

    The safetensors layout (8-byte header length, JSON header, raw little-endian data) is written
    by hand so that only one tensor is ever in memory: the 1.4B file (2.9 GB) needs ~0.6 GB RSS.
    """
    shapes = tensor_shapes(config)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in shapes:
            tensor = torch.empty(shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            fh.write(tensor.view(-1).view(torch.uint8).numpy())
    (path / "config.json").write_text(json.dumps(config, indent=2))


def bench_home() -> Path:
    from looplm.default_model import looplm_home

    return looplm_home() / "bench"


def ensure_checkpoint(shape: str, workdir: Path, seed: int = 0) -> tuple[Path, bool]:
    """The random checkpoint for `shape` under `workdir`, written if absent. Returns (dir, written)."""
    config = SHAPES[shape]
    target = workdir / f"ouro-{shape}-random-bf16-{CHECKPOINT_VERSION}-seed{seed}"
    weights = target / "model.safetensors"
    expected_bytes = 2 * sum(_numel(s) for _, s in tensor_shapes(config))
    if weights.exists() and (target / "config.json").exists():
        same_config = json.loads((target / "config.json").read_text()) == config
        if same_config and weights.stat().st_size >= expected_bytes:
            return target, False
        raise CheckpointError(f"{target}: exists but does not match the '{shape}' shape; delete it or pick --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < expected_bytes + (512 << 20):
        raise CheckpointError(
            f"{workdir}: {free / 1e9:.1f} GB free, the '{shape}' checkpoint needs {expected_bytes / 1e9:.1f} GB "
            "(+0.5 GB margin); pass --workdir on a disk with more space"
        )
    staging = Path(tempfile.mkdtemp(prefix=".bench-", dir=workdir))
    try:
        write_random_checkpoint_bf16(staging, config, seed)
        staging.chmod(0o755)  # mkdtemp makes it private
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, True


# ---------------------------------------------------------------------------------------------
# Contention-aware timing


class CpuMeter:
    """Wall time plus the CPU seconds used by other processes (system busy - this process)."""

    def __init__(self) -> None:
        self.process = psutil.Process()

    def mark(self) -> tuple[float, float, float]:
        cpu = psutil.cpu_times()
        busy = cpu.user + cpu.system + cpu.nice + getattr(cpu, "irq", 0.0) + getattr(cpu, "softirq", 0.0)
        own = self.process.cpu_times()
        return time.perf_counter(), busy, own.user + own.system

    @staticmethod
    def other_cores(start: tuple[float, float, float], end: tuple[float, float, float]) -> float | None:
        """None for spans under MIN_METER_SECONDS: CPU times tick in 10 ms, too coarse below that."""
        wall = end[0] - start[0]
        if wall < MIN_METER_SECONDS:
            return None
        return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall)


def _timed(fn, repeats: int, meter: CpuMeter) -> tuple[list[float], float | None]:  # noqa: ANN001
    """Seconds of each of `repeats` calls after one warmup call, and the other load over all of them."""
    fn()
    seconds = []
    first = meter.mark()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds, CpuMeter.other_cores(first, meter.mark())


def _spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# ---------------------------------------------------------------------------------------------
# Phases


def machine_info() -> dict:
    model_name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model_name = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu_model": model_name,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_isa": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


def model_bytes(model) -> dict:  # noqa: ANN001 - OuroForCausalLM
    """Parameter counts and the bytes one decoded token reads (batch 1)."""
    config = model.config
    steps = config.total_ut_steps
    params = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
    layers = sum(p.nbytes for n, p in params.items() if n.startswith("model.layers."))
    per_step_tail = sum(p.nbytes for n, p in params.items() if n.startswith(("model.norm.", "model.early_exit_gate.")))
    lm_head = model.lm_head.weight.nbytes
    embedding_row = model.model.embed_tokens.weight[0].nbytes
    kv_per_token = 2 * config.num_kv_slots * config.num_key_value_heads * config.head_dim * model.dtype.itemsize
    return {
        "params": sum(p.numel() for p in params.values()),
        "weight_bytes": sum(p.nbytes for p in params.values()),
        "layer_bytes": layers,
        "lm_head_bytes": lm_head,
        "ut_steps": steps,
        "kv_bytes_per_token": kv_per_token,
        "bytes_per_decoded_token": layers * steps + per_step_tail * steps + lm_head + embedding_row,
    }


_LOAD_CHILD = """
import json, resource, sys, time
import psutil, torch
threads = int(sys.argv[2])
if threads > 0:
    torch.set_num_threads(threads)
import looplm
before = psutil.Process().memory_info().rss
start = time.perf_counter()
model = looplm.load(sys.argv[1], dtype="bfloat16")
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "rss_before_bytes": before, "peak_rss_bytes": peak,
                  "rss_after_bytes": psutil.Process().memory_info().rss}))
"""


def measure_load(path: Path, threads: int | None) -> dict:
    """`looplm.load(path, dtype="bfloat16")` in a fresh interpreter: time and peak RSS (ru_maxrss)."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_CHILD, str(path), str(threads or 0)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"{path}: loading in a subprocess failed ({tail})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_read_bandwidth(mib: int, meter: CpuMeter, repeats: int = 9) -> dict:
    """GB/s of `torch.sum` over a bf16 buffer of `mib` MiB (reads only, fp32 accumulation)."""
    buffer = torch.ones((mib << 20) // 2, dtype=torch.bfloat16)
    seconds, other = _timed(lambda: buffer.sum(), repeats, meter)
    rates = [buffer.nbytes / s / 1e9 for s in seconds]
    return {"buffer_bytes": buffer.nbytes, "gb_s": _spread(rates), "other_cores": other}


def measure_gemv(model, meter: CpuMeter, repeats: int = 5) -> dict:  # noqa: ANN001
    """M=1 bf16 `F.linear` over the model's own weights: per projection kind and the whole stack.

    Timed twice: as decode runs today (torch's default, oneDNN for bf16), and with
    `torch.backends.mkldnn` disabled, which routes M=1 to ATen's own bf16 GEMV kernel.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            groups.setdefault(name.rsplit(".", 1)[-1], []).append(module.weight)
    groups["lm_head"] = [model.lm_head.weight]
    stack = [w for kind, ws in groups.items() if kind != "lm_head" for w in ws]
    inputs = {w.shape[1]: torch.randn(1, 1, w.shape[1], dtype=w.dtype) for w in stack + groups["lm_head"]}

    def run(weights: list[torch.Tensor]) -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    result: dict = {"kinds": {}}
    with torch.inference_mode():
        for kind, weights in [("layer_stack", stack), *groups.items()]:
            nbytes = sum(w.nbytes for w in weights)
            entry = {"shape": "x".join(str(d) for d in weights[0].shape), "count": len(weights), "bytes": nbytes}
            for suffix, mkldnn in (("", True), ("_no_mkldnn", False)):
                with _mkldnn_enabled(mkldnn):
                    seconds, other = _timed(lambda ws=weights: run(ws), repeats, meter)
                entry["seconds" + suffix] = _spread(seconds)
                entry["gb_s" + suffix] = nbytes / statistics.median(seconds) / 1e9
                entry["other_cores" + suffix] = other
            if kind == "layer_stack":
                result["layer_stack"] = entry
            else:
                result["kinds"][kind] = entry
    steps = model.config.total_ut_steps
    for suffix in ("", "_no_mkldnn"):  # batch-1 ceiling if decode were only these GEMVs
        step_s = steps * result["layer_stack"]["seconds" + suffix]["median"]
        result["linears_only_tok_s" + suffix] = 1.0 / (step_s + result["kinds"]["lm_head"]["seconds" + suffix]["median"])
    return result


@contextlib.contextmanager
def _mkldnn_enabled(enabled: bool) -> Iterator[None]:
    with warnings.catch_warnings():  # torch warns about TF32 on Intel GPUs whenever the flags change
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=enabled):
            yield


def _prompt(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def timed_generation(
    model, prompt: torch.Tensor, max_new_tokens: int, meter: CpuMeter, use_cache: bool = True,  # noqa: ANN001
) -> Iterator[tuple[int, tuple[float, float, float]]]:
    """Yield (event index, meter mark) as each token of `stream_generate` arrives.

    Event 0 arrives after the prefill; event i > 0 after i decode forward passes. eos is off, so
    every run produces exactly `max_new_tokens` tokens.
    """
    from looplm.generate import stream_generate

    for event in stream_generate(model, prompt, max_new_tokens, eos_token_ids=[], use_cache=use_cache):
        yield event.index, meter.mark()


def measure_prefill(model, options: BenchOptions, meter: CpuMeter, runs: int) -> list[dict]:  # noqa: ANN001
    samples = []
    for run in range(runs):
        prompt = _prompt(1, options.prompt_len, model.config.vocab_size, options.seed + 100 + run)
        start = meter.mark()
        for _, mark in timed_generation(model, prompt, 1, meter):
            samples.append({"seconds": mark[0] - start[0], "other_cores": CpuMeter.other_cores(start, mark)})
    return samples


def measure_decode(model, batch: int, options: BenchOptions, meter: CpuMeter) -> dict:  # noqa: ANN001
    """One prefill, `warmup_steps` decode steps, then `repeats` windows of `new_tokens` steps."""
    new_tokens = options.resolved_new_tokens()
    timed_steps = options.repeats * new_tokens
    profile_steps = options.profile_steps if options.profile and batch == 1 else 0
    total = 1 + options.warmup_steps + timed_steps + profile_steps
    prompt = _prompt(batch, options.prompt_len, model.config.vocab_size, options.seed + batch)
    start = meter.mark()
    marks = [start]
    events = timed_generation(model, prompt, total, meter)
    for _ in range(1 + options.warmup_steps + timed_steps):
        marks.append(next(events)[1])
    profile = None
    if profile_steps:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profile_start = time.perf_counter()
            for _ in range(profile_steps):
                next(events)
            profile_wall = time.perf_counter() - profile_start
        profile = summarize_profile(prof, profile_wall, profile_steps)
    events.close()
    windows = []
    first = 2 + options.warmup_steps  # marks[1] = first token (prefill); decode steps follow
    for r in range(options.repeats):
        a, b = marks[first - 1 + r * new_tokens], marks[first - 1 + (r + 1) * new_tokens]
        seconds = b[0] - a[0]
        windows.append({"seconds": seconds, "tok_s": new_tokens / seconds, "other_cores": CpuMeter.other_cores(a, b)})
    steps = [b[0] - a[0] for a, b in zip(marks[first - 1 :], marks[first:])]
    per_seq = [w["tok_s"] for w in windows]
    return {
        "batch": batch,
        "prompt_len": options.prompt_len,
        "prefill_seconds": marks[1][0] - start[0],
        "prefill_other_cores": CpuMeter.other_cores(start, marks[1]),
        "windows": windows,
        "tok_s_per_seq": _spread(per_seq),
        "tok_s_aggregate": _spread([batch * t for t in per_seq]),
        "ms_per_step": _spread([1000 * s for s in steps]),
        "other_cores_max": _max_load(w["other_cores"] for w in windows),
        "context_mean": options.prompt_len + 1 + options.warmup_steps + timed_steps / 2,
        "profile": profile,
    }


def summarize_profile(prof, wall: float, steps: int, top: int = 14) -> dict:  # noqa: ANN001
    """Self CPU time per op over `steps` decode steps, with the matmul family rolled up."""
    rows = []
    for item in prof.key_averages():
        rows.append({"op": item.key, "self_ms": item.self_cpu_time_total / 1000 / steps, "calls": item.count // steps})
    rows.sort(key=lambda r: r["self_ms"], reverse=True)
    total = sum(r["self_ms"] for r in rows)
    matmul_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::", "aten::mv")
    matmul = sum(r["self_ms"] for r in rows if r["op"].startswith(matmul_ops))
    attention = sum(r["self_ms"] for r in rows if "attention" in r["op"])
    return {"ms_per_step_profiled": 1000 * wall / steps, "self_ms_total": total, "matmul_ms": matmul,
            "attention_ms": attention, "top_ops": rows[:top]}


def measure_baseline(model, options: BenchOptions, meter: CpuMeter) -> dict:  # noqa: ANN001
    """Cached vs no-cache (full recompute every token) decode at a short prompt, batch 1."""
    prompt = _prompt(1, options.baseline_prompt_len, model.config.vocab_size, options.seed + 7)
    result = {"prompt_len": options.baseline_prompt_len, "tokens": options.baseline_tokens}
    for use_cache in (True, False):
        marks = [mark for _, mark in timed_generation(model, prompt, 1 + options.baseline_tokens, meter, use_cache)]
        seconds = marks[-1][0] - marks[0][0]
        key = "cached" if use_cache else "no_cache"
        result[key] = {"tok_s": options.baseline_tokens / seconds,
                       "other_cores": CpuMeter.other_cores(marks[0], marks[-1])}
    result["speedup"] = result["cached"]["tok_s"] / result["no_cache"]["tok_s"]
    return result


def other_load_now(seconds: float = 1.0) -> float:
    meter = CpuMeter()
    start = meter.mark()
    time.sleep(seconds)
    return CpuMeter.other_cores(start, meter.mark())


def wait_for_quiet(limit: float, log) -> float:  # noqa: ANN001
    """Sleep until other processes use < BUSY_OTHER_CORES for 5 s, or `limit` seconds pass."""
    deadline = time.monotonic() + limit
    load = other_load_now(5.0)
    while load >= BUSY_OTHER_CORES and time.monotonic() < deadline:
        log(f"waiting for a quiet machine: other processes use {load:.2f} cores")
        load = other_load_now(5.0)
    return load


# ---------------------------------------------------------------------------------------------
# Driver


def run_bench(options: BenchOptions, log=None) -> dict:  # noqa: ANN001 - log: Callable[[str], None]
    """Run every phase and return all numbers as one JSON-ready dict (no tables printed)."""
    import looplm

    options.check()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    meter = CpuMeter()
    began = time.perf_counter()
    workdir = Path(options.workdir).expanduser() if options.workdir else bench_home()
    result: dict = {"options": {**asdict(options), "new_tokens": options.resolved_new_tokens()},
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
                    "other_cores_at_start": wait_for_quiet(options.wait_quiet, log) if options.wait_quiet
                    else other_load_now()}

    log(f"checkpoint: {options.shape} under {workdir}")
    start = time.perf_counter()
    path, written = ensure_checkpoint(options.shape, workdir, options.seed)
    result["checkpoint"] = {"path": str(path), "written": written, "write_seconds": time.perf_counter() - start}

    log("load: fresh subprocess")
    load = measure_load(path, options.threads)
    log("load: this process")
    model = looplm.load(path, dtype="bfloat16")
    sizes = model_bytes(model)
    load["peak_rss_over_weights"] = load["peak_rss_bytes"] / sizes["weight_bytes"]
    result["model"], result["load"] = sizes, load

    log("bandwidth: torch.sum and the model's GEMVs")
    result["bandwidth"] = measure_read_bandwidth(options.bandwidth_mib, meter)
    result["gemv"] = measure_gemv(model, meter)

    with torch.inference_mode():
        log("warmup")
        for batch in options.batch_sizes:
            for _ in timed_generation(model, _prompt(batch, 16, model.config.vocab_size, 1), 3, meter):
                pass
        decode = []
        for batch in options.batch_sizes:
            log(f"decode: batch {batch}, prompt {options.prompt_len}")
            decode.append(measure_decode(model, batch, options, meter))
        extra_prefills = options.repeats - (1 if 1 in options.batch_sizes else 0)
        log(f"prefill: batch 1, {extra_prefills} more run(s)")
        prefill = measure_prefill(model, options, meter, extra_prefills)
        for row in decode:  # the batch-1 decode run's prefill is one more sample
            if row["batch"] == 1:
                prefill.insert(0, {"seconds": row["prefill_seconds"], "other_cores": row["prefill_other_cores"]})
        if options.baseline:
            log(f"baseline: no cache, prompt {options.baseline_prompt_len}")
            result["baseline"] = measure_baseline(model, options, meter)

    result["prefill"] = {
        "prompt_len": options.prompt_len,
        "tok_s": _spread([options.prompt_len / s["seconds"] for s in prefill]),
        "seconds": _spread([s["seconds"] for s in prefill]),
        "other_cores_max": _max_load(s["other_cores"] for s in prefill),
    }
    bandwidth = result["bandwidth"]["gb_s"]["median"] * 1e9
    for row in decode:
        weights = sizes["bytes_per_decoded_token"]
        kv_read = row["batch"] * sizes["kv_bytes_per_token"] * row["context_mean"]
        row["roofline_tok_s"] = row["batch"] * bandwidth / weights  # aggregate, weights only
        row["roofline_kv_tok_s"] = row["batch"] * bandwidth / (weights + kv_read)
        row["pct_roofline"] = 100 * row["tok_s_aggregate"]["median"] / row["roofline_tok_s"]
        row["pct_roofline_kv"] = 100 * row["tok_s_aggregate"]["median"] / row["roofline_kv_tok_s"]
        row["achieved_gb_s"] = row["tok_s_aggregate"]["median"] / row["batch"] * (weights + kv_read) / 1e9
    result["decode"] = decode
    result["total_seconds"] = time.perf_counter() - began
    return result


def print_report(result: dict, console=None) -> None:  # noqa: ANN001 - rich.console.Console
    from rich.console import Console
    from rich.table import Table

    if console is None:  # piped output: wide enough for the decode table
        console = Console() if sys.stdout.isatty() else Console(width=132)
    machine, sizes, load = result["machine"], result["model"], result["load"]
    opts = result["options"]
    gib = 1 << 30

    card = Table(title=f"looplm bench: Ouro {opts['shape']} shape, random bf16 weights, CPU", show_header=False)
    card.add_column(style="bold")
    card.add_column()
    card.add_row("CPU", f"{machine['cpu_model']} ({machine['logical_cpus']} logical)")
    card.add_row("ISA", f"{machine['cpu_capability']} {' '.join(machine['bf16_isa'])}".strip())
    card.add_row("torch", f"{machine['torch']}, {machine['torch_threads']} threads")
    card.add_row("params", f"{sizes['params'] / 1e9:.3f} B" if sizes["params"] >= 1e8 else f"{sizes['params'] / 1e6:.3f} M")
    card.add_row("weight bytes", f"{sizes['weight_bytes'] / 1e9:.3f} GB")
    card.add_row("KV bytes / token", f"{sizes['kv_bytes_per_token'] / 1024:.0f} KiB ({sizes['ut_steps']} UT steps)")
    card.add_row("bytes read / decoded token", f"{sizes['bytes_per_decoded_token'] / 1e9:.3f} GB "
                 f"(layers x {sizes['ut_steps']} + lm_head once; embedding row negligible)")
    card.add_row("other load at start", f"{_fmt_load(result['other_cores_at_start'])} cores (CPU busy from other processes)")
    console.print(card)

    table = Table(title="load (fresh subprocess)")
    for name in ("seconds", "RSS before", "peak RSS", "peak RSS / weights"):
        table.add_column(name, justify="right")
    table.add_row(f"{load['seconds']:.2f}", f"{load['rss_before_bytes'] / gib:.2f} GiB",
                  f"{load['peak_rss_bytes'] / gib:.2f} GiB", f"{load['peak_rss_over_weights']:.2f}")
    console.print(table)

    table = Table(title="read bandwidth, GB/s (median \\[min-max])")
    for name in ("what", "shape x count", "default (oneDNN)", "mkldnn off", "other load"):
        table.add_column(name, justify="right")
    bw = result["bandwidth"]
    table.add_row("torch.sum, bf16", f"{bw['buffer_bytes'] / gib:.1f} GiB", _fmt_spread(bw["gb_s"], 1), "",
                  _fmt_load(bw["other_cores"]))
    gemv = result["gemv"]
    for kind, entry in [("all layers", gemv["layer_stack"]), *gemv["kinds"].items()]:
        table.add_row(f"F.linear M=1 {kind}", f"{entry['shape']} x{entry['count']}", f"{entry['gb_s']:.1f}",
                      f"{entry['gb_s_no_mkldnn']:.1f}",
                      _fmt_load(_max_load([entry["other_cores"], entry["other_cores_no_mkldnn"]])))
    console.print(table)

    pre = result["prefill"]
    table = Table(title=f"prefill, batch 1, {pre['prompt_len']} tokens")
    for name in ("tok/s median \\[min-max]", "seconds", "runs", "other load max"):
        table.add_column(name, justify="right")
    table.add_row(_fmt_spread(pre["tok_s"], 1), _fmt_spread(pre["seconds"], 2), str(pre["tok_s"]["n"]),
                  _fmt_load(pre["other_cores_max"]))
    console.print(table)

    table = Table(title=f"decode, prompt {opts['prompt_len']}, {opts['new_tokens']} tokens x {opts['repeats']} repeats")
    for name in ("batch", "tok/s per seq", "tok/s total", "ms/step", "roofline tok/s", "% roofline",
                 "% roofline +KV", "GB/s achieved", "prefill s", "other load max"):
        table.add_column(name, justify="right")
    for row in result["decode"]:
        table.add_row(str(row["batch"]), _fmt_spread(row["tok_s_per_seq"], 2), _fmt_spread(row["tok_s_aggregate"], 2),
                      f"{row['ms_per_step']['median']:.0f}", f"{row['roofline_tok_s']:.2f}",
                      f"{row['pct_roofline']:.0f}%", f"{row['pct_roofline_kv']:.0f}%", f"{row['achieved_gb_s']:.1f}",
                      f"{row['prefill_seconds']:.1f}", _fmt_load(row["other_cores_max"]))
    console.print(table)
    console.print(f"batch-1 ceiling if decode were only its GEMVs: {gemv['linears_only_tok_s']:.2f} tok/s "
                  f"(default), {gemv['linears_only_tok_s_no_mkldnn']:.2f} tok/s (mkldnn off)")

    if "baseline" in result:
        base = result["baseline"]
        table = Table(title=f"baseline: no-cache recompute, batch 1, prompt {base['prompt_len']}")
        for name in ("cached tok/s", "no-cache tok/s", "cache speedup", "other load max"):
            table.add_column(name, justify="right")
        table.add_row(f"{base['cached']['tok_s']:.2f}", f"{base['no_cache']['tok_s']:.2f}", f"{base['speedup']:.1f}x",
                      _fmt_load(_max_load([base["cached"]["other_cores"], base["no_cache"]["other_cores"]])))
        console.print(table)

    for row in result["decode"]:
        if row.get("profile"):
            prof = row["profile"]
            table = Table(title=f"profile: batch 1 decode, {prof['ms_per_step_profiled']:.0f} ms/step under the profiler")
            for name in ("op", "self ms/step", "calls/step", "share"):
                table.add_column(name, justify="right")
            for op in prof["top_ops"]:
                table.add_row(op["op"], f"{op['self_ms']:.1f}", str(op["calls"]),
                              f"{100 * op['self_ms'] / prof['self_ms_total']:.0f}%")
            console.print(table)
            share = 100 / prof["self_ms_total"]
            console.print(f"matmul family {prof['matmul_ms']:.0f} ms/step ({prof['matmul_ms'] * share:.0f}% of op "
                          f"self time), attention {prof['attention_ms']:.0f} ms/step "
                          f"({prof['attention_ms'] * share:.0f}%)")

    flagged = [name for name, value in _other_loads(result) if value is not None and value > BUSY_OTHER_CORES]
    if flagged:
        console.print(f"[yellow]warning: other processes kept > {BUSY_OTHER_CORES} cores busy during: "
                      f"{', '.join(flagged)}; those numbers are pessimistic[/yellow]")


def _other_loads(result: dict) -> list[tuple[str, float]]:
    loads = [("bandwidth", result["bandwidth"]["other_cores"]), ("gemv", result["gemv"]["layer_stack"]["other_cores"]),
             ("prefill", result["prefill"]["other_cores_max"])]
    loads += [(f"decode batch {row['batch']}", row["other_cores_max"]) for row in result["decode"]]
    return loads


def _max_load(values) -> float | None:  # noqa: ANN001 - Iterable[float | None]
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _fmt_load(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_spread(spread: dict, digits: int) -> str:
    return f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}-{spread['max']:.{digits}f}]"


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="looplm bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.4b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=None,
                        help=f"decode tokens per repeat (default: {DEFAULT_NEW_TOKENS})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated, e.g. 1,4")
    parser.add_argument("--workdir", default=None, help="where the random checkpoint lives (default $LOOPLM_HOME/bench)")
    parser.add_argument("--json-out", default=None, help="also write the JSON document to this file")
    parser.add_argument("--baseline", action="store_true", help="also time no-cache recompute at a short prompt")
    parser.add_argument("--baseline-prompt-len", type=int, default=32)
    parser.add_argument("--baseline-tokens", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="torch.profiler op table over batch-1 decode steps")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--bandwidth-mib", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for other processes to leave the CPU idle")
    return parser


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    try:
        batch_sizes = tuple(int(b) for b in str(args.batch_sizes).split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    fields = {f: getattr(args, f) for f in BenchOptions.__dataclass_fields__ if f != "batch_sizes"}
    return BenchOptions(batch_sizes=batch_sizes, **fields)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run, print the tables and, as the last stdout line, the JSON document."""
    from looplm.errors import LooplmError

    args = build_parser().parse_args(argv)
    try:
        options = options_from_args(args)
        check_writable(options.json_out, "--json-out")
        result = run_bench(options)
    except LooplmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_report(result)
    return exit_code_of(lambda: emit_json(result, options.json_out))


def emit_json(result: dict, json_out: str | None) -> None:
    """The benchmarks' contract: the whole result as the last stdout line, and in `json_out`."""
    document = json.dumps(result, separators=(",", ":"))
    sys.stdout.flush()
    print(document, flush=True)
    if json_out:
        write_result(json_out, document + "\n", PRINTED_ABOVE)


__all__ = ["BenchOptions", "SHAPES", "ensure_checkpoint", "main", "print_report", "run_bench",
           "write_random_checkpoint_bf16"]


if __name__ == "__main__":
    raise SystemExit(main())
