"""GPU decode benchmark: the static decode step (CUDA graph / torch.compile) against the HBM roofline.

What one run measures, for the Ouro-1.4B shape with random weights built directly on the GPU
(no checkpoint file), per dtype (bf16, and int4 when `looplm.quant.quantize_model` exists) and
per batch size (1 and 8 by default):
- HBM read bandwidth: `torch.sum` over a bf16 buffer far larger than L2, timed with CUDA events
  (a `copy_` is timed too, for reference: it reads and writes);
- prefill tok/s (the normal dynamic path) and decode tok/s through `StaticDecoder` (or, with
  `--mode dynamic`, the dynamic `decode_step` that `generate` runs by default) (median and
  min-max over `repeats` windows of `new_tokens` tokens, after warmup);
- bytes one decoded token reads (layer weights x UT steps + final norm/gate x steps + lm_head
  once + one embedding row; quantized buffers counted as stored), and % of the roofline
  batch x bandwidth / bytes. "+KV" also counts the K/V the static step reads: the whole
  preallocated cache, every step. The datasheet roofline uses the GPU's published bandwidth
  where this file knows it (the issue's "about 330 tok/s" for 1.4B bf16 on an H100 SXM).

`run_cuda_bench` refuses with one line (a `ConfigError`) when CUDA is unavailable. The body
(`run_static_bench`) is device-agnostic so that it runs on CPU in the tests with a tiny shape.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from looplm.config import OuroConfig
from looplm.errors import ConfigError, GenerationError, LooplmError, exit_code_of
from looplm.models.ouro import OuroForCausalLM
from looplm.output_files import PRINTED_ABOVE, check_writable, write_result
from looplm.static_decode import ATTENTIONS, MODES, StaticDecoder, compile_settings

DTYPES = ("bf16", "int4")
# "dynamic": `OuroForCausalLM.decode_step` over a growing `KVCache` (what `generate` runs by
# default); the others are `StaticDecoder` modes.
BENCH_MODES = ("dynamic", *(mode for mode in MODES if mode != "auto"))
TARGET_PCT = 70.0  # issue 8: bf16 batch-1 decode at >= 70% of the HBM roofline
# Published HBM bandwidth, GB/s, by a substring of `torch.cuda.get_device_name()` (first match wins).
DATASHEET_GB_S: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40 GB parts
)

Log = Callable[[str], None]


@dataclass
class CudaBenchOptions:
    shape: str = "1.4b"
    dtypes: tuple[str, ...] = DTYPES
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 512
    new_tokens: int = 64
    repeats: int = 5
    warmup_steps: int = 4
    # A `looplm.static_decode.MODES` entry. Eager kernels in a graph ("graph") still launch ~70
    # small kernels per (step, layer); compiling first fuses the elementwise work between GEMVs.
    mode: str = "compile+graph"
    compile_mode: str = "default"  # what was measured; max-autotune adds a GEMM search (not measured)
    # A/B options of the static step (not measured on a GPU yet): FlexAttention or two matmuls
    # instead of SDPA over the masked cache, and q|k|v, gate|up as one GEMM each (bf16 rows only).
    attention: str = "sdpa"
    fuse_projections: bool = False
    # Inductor config overrides for the compile modes, e.g. {"coordinate_descent_tuning": True}
    # (`--inductor-option NAME=VALUE`); see `looplm.static_decode.compile_settings`.
    inductor_options: dict = field(default_factory=dict)
    bandwidth_mib: int = 4096
    bandwidth_repeats: int = 20
    int4_group_size: int = 128
    seed: int = 0
    # Decode steps traced with torch.profiler after the timed windows (0: none): kernel time per
    # step against the step's wall time, and the kernels that take it.
    profile_steps: int = 0

    def check(self) -> None:
        from looplm.bench import SHAPES

        if self.shape not in SHAPES:
            raise ConfigError(f"unknown shape '{self.shape}' (choose {', '.join(SHAPES)})")
        if not self.dtypes or any(d not in DTYPES for d in self.dtypes):
            raise ConfigError(f"--dtypes must be a subset of {', '.join(DTYPES)}, got {self.dtypes!r}")
        if self.mode not in BENCH_MODES:
            raise ConfigError(f"--mode must be one of {', '.join(BENCH_MODES)}, got {self.mode!r}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.inductor_options:
            if "compile" not in self.mode:
                raise ConfigError(f"--inductor-option applies to the compile modes, not --mode {self.mode}")
            try:
                compile_settings(self.compile_mode, self.inductor_options)
            except GenerationError as exc:
                raise ConfigError(str(exc)) from None
        positive = {"prompt_len": self.prompt_len, "new_tokens": self.new_tokens, "repeats": self.repeats,
                    "bandwidth_mib": self.bandwidth_mib, "bandwidth_repeats": self.bandwidth_repeats,
                    "int4_group_size": self.int4_group_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"--batch-sizes must be positive integers, got {self.batch_sizes!r}")
        if self.warmup_steps < 0 or self.profile_steps < 0:
            raise ConfigError("--warmup-steps and --profile-steps must not be negative")

    def cache_len(self) -> int:
        """Positions the static cache needs: prompt, first token, warmup, every timed and profiled token."""
        return self.prompt_len + 1 + self.warmup_steps + self.repeats * self.new_tokens + self.profile_steps


# ---------------------------------------------------------------------------------------------
# Pure arithmetic (tested on CPU)


def spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def datasheet_gb_s(device_name: str) -> float | None:
    for key, gb_s in DATASHEET_GB_S:
        if key in device_name:
            return gb_s
    return None


def roofline_tok_s(bandwidth_gb_s: float, bytes_per_step: float, batch: int) -> float:
    """Aggregate tok/s if a decode step (one token for each of `batch` rows) only streamed its bytes."""
    return batch * bandwidth_gb_s * 1e9 / bytes_per_step


def add_roofline(row: dict, read_gb_s: float, datasheet: float | None) -> dict:
    """Fill the roofline columns of a measured decode row (needs tok_s_aggregate, batch, byte counts)."""
    batch, weights = row["batch"], row["weight_bytes_per_step"]
    with_kv = weights + row["kv_bytes_per_step"]
    measured = row["tok_s_aggregate"]["median"]
    row["roofline_tok_s"] = roofline_tok_s(read_gb_s, weights, batch)
    row["roofline_kv_tok_s"] = roofline_tok_s(read_gb_s, with_kv, batch)
    row["pct_roofline"] = 100 * measured / row["roofline_tok_s"]
    row["pct_roofline_kv"] = 100 * measured / row["roofline_kv_tok_s"]
    row["achieved_gb_s"] = measured / batch * with_kv / 1e9  # steps/s x bytes per step
    if datasheet is not None:
        row["datasheet_roofline_tok_s"] = roofline_tok_s(datasheet, weights, batch)
        row["pct_datasheet_roofline"] = 100 * measured / row["datasheet_roofline_tok_s"]
    return row


def target_check(rows: list[dict]) -> dict | None:
    """The issue's target on the bf16 batch-1 row: >= TARGET_PCT of the roofline."""
    for row in rows:
        if row.get("status") == "ok" and row["dtype"] == "bf16" and row["batch"] == 1:
            result = {"target_pct": TARGET_PCT, "pct_roofline": row["pct_roofline"],
                      "met_measured": row["pct_roofline"] >= TARGET_PCT}
            if "pct_datasheet_roofline" in row:
                result["pct_datasheet_roofline"] = row["pct_datasheet_roofline"]
                result["met_datasheet"] = row["pct_datasheet_roofline"] >= TARGET_PCT
            return result
    return None


def markdown_table(rows: list[dict]) -> str:
    """The decode rows as a markdown table (rows that did not run show their status)."""
    header = ("| dtype | batch | decode tok/s total, median [min-max] | ms/step | GB read/step (weights + KV) "
              "| roofline tok/s | % roofline | % roofline +KV | % datasheet roofline | prefill tok/s | setup s |")
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"| {row['dtype']} | {row['batch']} | {row.get('status', 'not run')} |" + " |" * (columns - 3))
            continue
        agg = row["tok_s_aggregate"]
        sheet = row.get("pct_datasheet_roofline")
        lines.append(
            f"| {row['dtype']} | {row['batch']} | {agg['median']:.1f} [{agg['min']:.1f}-{agg['max']:.1f}] "
            f"| {row['ms_per_step']['median']:.2f} "
            f"| {row['weight_bytes_per_step'] / 1e9:.2f} + {row['kv_bytes_per_step'] / 1e9:.2f} "
            f"| {row['roofline_tok_s']:.0f} | {row['pct_roofline']:.0f}% | {row['pct_roofline_kv']:.0f}% "
            f"| {'-' if sheet is None else f'{sheet:.0f}%'} | {row['prefill_tok_s']['median']:.0f} "
            f"| {row['setup_seconds']:.1f} |"
        )
    return "\n".join(lines)


def mode_label(opts: dict) -> str:
    """The run's mode, with its Inductor overrides when it had any."""
    extra = opts.get("inductor_options") or {}
    return " ".join([opts.get("mode", "?"), *(f"{k}={v}" for k, v in sorted(extra.items()))])


def read_saved_run(path: Path) -> tuple[str, dict]:
    """(name, document) of a run saved with --json-out, or a ConfigError saying why it is not one."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a saved run: {exc}") from None
    rows = document.get("rows") if isinstance(document, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "dtype" in r and "batch" in r for r in rows):
        raise ConfigError(f"{path} is not a saved `looplm bench --device cuda` run (no decode rows)")
    return path.stem, document


def compare_table(runs: list[tuple[str, dict]]) -> str:
    """Saved runs (name, JSON document) side by side, one line per decode row, with the speed-up
    over the first run's row of the same dtype and batch (the runs being A/B variants)."""
    baseline_name, baseline = runs[0]
    base = {(r["dtype"], r["batch"]): r for r in baseline["rows"] if r.get("status") == "ok"}
    header = ("| run | mode | attention | fused | dtype | batch | decode tok/s total, median [min-max] | ms/step "
              f"| % roofline | vs {baseline_name} |")
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns]
    for name, result in runs:
        opts = result.get("options", {})
        for row in result["rows"]:
            head = f"| {name} | {mode_label(opts)} | {row.get('attention', opts.get('attention', 'sdpa'))} "
            head += f"| {'yes' if row.get('fused_projections') else 'no'} | {row['dtype']} | {row['batch']} "
            if row.get("status") != "ok":
                lines.append(head + f"| {row.get('status', 'not run')} |" + " |" * (columns - 7))
                continue
            agg, ref = row["tok_s_aggregate"], base.get((row["dtype"], row["batch"]))
            ratio = f"{agg['median'] / ref['tok_s_aggregate']['median']:.2f}x" if ref else "-"
            lines.append(head + f"| {agg['median']:.1f} [{agg['min']:.1f}-{agg['max']:.1f}] "
                         f"| {row['ms_per_step']['median']:.2f} | {row['pct_roofline']:.0f}% | {ratio} |")
    return "\n".join(lines)


def format_profile(row: dict, top: int = 10) -> list[str]:
    """Lines for one row's profile: kernel time per step against wall time, then the top kernels."""
    prof = row["profile"]
    head = (f"profile {row['dtype']} batch {row['batch']}: {prof['kind']} time {prof['us_per_step'] / 1000:.2f} ms "
            f"per step of {row['ms_per_step']['median']:.2f} ms wall, {prof['calls_per_step']:.0f} calls per step "
            f"({prof['steps']} steps traced)")
    lines = [head]
    for entry in prof["top"][:top]:
        lines.append(f"  {entry['us_per_step']:9.1f} us/step {entry['calls_per_step']:7.1f} calls  {entry['name']}")
    return lines


def format_report(result: dict) -> str:
    """Plain text: device card, bandwidth, the decode table, the target line."""
    dev, bw, opts = result["device"], result["bandwidth"], result["options"]
    sheet = result.get("datasheet_gb_s")
    variant = f"mode {opts['mode']}"
    if opts["mode"] != "dynamic":
        variant += f", attention {opts.get('attention', 'sdpa')}"
        variant += ", q|k|v and gate|up fused in bf16 rows" if opts.get("fuse_projections") else ""
        if opts.get("inductor_options"):
            variant += ", Inductor " + ", ".join(f"{k}={v}" for k, v in sorted(opts["inductor_options"].items()))
    lines = [
        (f"looplm bench --device {dev['type']}: Ouro {opts['shape']} shape, random weights, decode "
         f"({variant}), {result['date']}"),
        f"device: {dev['name']}; torch {dev['torch']}" + (f", CUDA {dev['cuda']}" if dev.get("cuda") else ""),
        f"read bandwidth (torch.sum over {bw['buffer_bytes'] / (1 << 30):.1f} GiB): "
        f"{bw['read_gb_s']['median']:.0f} GB/s [{bw['read_gb_s']['min']:.0f}-{bw['read_gb_s']['max']:.0f}]; "
        f"copy_ (read + write): {bw['copy_gb_s']['median']:.0f} GB/s; datasheet: "
        + ("unknown for this device" if sheet is None else f"{sheet:.0f} GB/s"),
        f"prompt {opts['prompt_len']}, decode {opts['new_tokens']} tokens x {opts['repeats']} repeats after "
        f"{opts['warmup_steps']} warmup steps; static cache {result['cache_len']} positions",
        "",
        markdown_table(result["rows"]),
    ]
    target = result.get("target")
    if target is not None:
        text = f"target: bf16 batch 1 >= {target['target_pct']:.0f}% of roofline: {target['pct_roofline']:.0f}% of the "
        text += f"measured-bandwidth roofline ({'met' if target['met_measured'] else 'not met'})"
        if "pct_datasheet_roofline" in target:
            text += f", {target['pct_datasheet_roofline']:.0f}% of the datasheet roofline "
            text += f"({'met' if target['met_datasheet'] else 'not met'})"
        lines += ["", text]
    for row in result["rows"]:
        if "profile" in row:
            lines += ["", *format_profile(row)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Measurement (device-agnostic; CUDA timing uses events)


class Timer:
    """Seconds between `start()` and `stop()`: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self._begin.elapsed_time(end) / 1000
        return time.perf_counter() - self._t0


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA device can be used, else one line saying why not."""
    if torch.version.cuda is None:
        return f"looplm bench --device cuda: this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "looplm bench --device cuda: no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / (1 << 30),
                    sm_count=props.multi_processor_count)
    else:
        info["name"] = "cpu"
    return info


def measure_bandwidth(device: torch.device, mib: int, repeats: int) -> dict:
    """GB/s of `torch.sum` (reads only) and `copy_` (reads + writes) over a `mib` MiB bf16 buffer."""
    timer = Timer(device)
    source = torch.ones((mib << 20) // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    rates: dict[str, list[float]] = {"read_gb_s": [], "copy_gb_s": []}
    for key, run, nbytes in (("read_gb_s", source.sum, source.nbytes),
                             ("copy_gb_s", lambda: target.copy_(source), 2 * source.nbytes)):
        run()  # warmup
        for _ in range(repeats):
            timer.start()
            run()
            rates[key].append(nbytes / timer.stop() / 1e9)
    return {"buffer_bytes": source.nbytes, **{key: spread(values) for key, values in rates.items()}}


def build_random_model(shape: str, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> OuroForCausalLM:
    """The shape's model with N(0, 0.02) weights (norms 1), built on `device` (no checkpoint file).

    Built on the meta device first, so host memory never holds the weights."""
    from looplm.bench import SHAPES

    with torch.device("meta"):
        model = OuroForCausalLM(OuroConfig.from_dict(SHAPES[shape])).to(dtype)
    if device.type == "meta":  # shapes and byte counts only
        return model.eval()
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def quantize_int4(model: OuroForCausalLM, group_size: int) -> tuple[OuroForCausalLM | None, str]:
    """`looplm.quant.quantize_model(model, bits=4, group_size=...)` if that exists; (model, "ok") or (None, why not)."""
    try:
        quant = importlib.import_module("looplm.quant")
    except ImportError as exc:
        return None, f"not available: looplm.quant cannot be imported ({exc})"
    quantize_model = getattr(quant, "quantize_model", None)
    if quantize_model is None:
        return None, "not available: looplm.quant has no quantize_model"
    try:
        returned = quantize_model(model, bits=4, group_size=group_size)
    except Exception as exc:  # noqa: BLE001 - report any failure as the row's status, keep the other rows
        return None, f"failed: quantize_model raised {type(exc).__name__}: {exc}"
    return (returned if isinstance(returned, nn.Module) else model), "ok"


def decode_bytes(model: OuroForCausalLM) -> dict:
    """Bytes one decode step reads per token of weights (parameters and buffers, as stored)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensors.setdefault(name, tensor)  # named_parameters already drops tied duplicates

    def under(*prefixes: str) -> int:
        return sum(t.nbytes for n, t in tensors.items() if n.startswith(prefixes))

    config = model.config
    steps = config.total_ut_steps
    embed = model.model.embed_tokens.weight
    layers = under("model.layers.")
    tail = under("model.norm.", "model.early_exit_gate.")
    lm_head = under("lm_head.")
    return {
        "weight_bytes": sum(t.nbytes for t in tensors.values()),
        "layer_bytes": layers,
        "lm_head_bytes": lm_head,
        "bytes_per_decoded_token": layers * steps + tail * steps + lm_head + embed.nbytes // embed.shape[0],
    }


def profile_decode(decoder: StaticDecoder | DynamicDecoder, token: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Trace `steps` decode steps with torch.profiler: on CUDA the GPU kernels (CUPTI reports
    those a graph replay launches too), elsewhere the CPU operators' self time. Kernel time per
    step well below the step's wall time means the step waits on launches, not on kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as trace:
        for _ in range(steps):
            token = decoder.step(token)[0].argmax(-1)
        if cuda:
            torch.cuda.synchronize(device)
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    events = []
    for event in trace.key_averages():
        if event.device_type != wanted:
            continue
        micros = event.self_device_time_total if cuda else event.self_cpu_time_total
        if micros > 0:
            events.append({"name": event.key[:120], "calls_per_step": event.count / steps, "us_per_step": micros / steps})
    events.sort(key=lambda entry: entry["us_per_step"], reverse=True)
    return {"kind": "GPU kernel" if cuda else "CPU operator", "steps": steps,
            "us_per_step": sum(e["us_per_step"] for e in events),
            "calls_per_step": sum(e["calls_per_step"] for e in events), "top": events[:25]}


class DynamicDecoder:
    """The dynamic decode step behind `StaticDecoder`'s interface, to time them the same way:
    `prefill` runs `run_steps` into a reused `KVCache` (reset, not reallocated), `step` is one
    `decode_step` (every UT step, the last one read, as the static step does at T=1.0)."""

    def __init__(self, model: OuroForCausalLM, batch_size: int, max_len: int) -> None:
        from looplm.exit import LastPolicy

        self.model, self.policy, self.setup_seconds = model, LastPolicy(), 0.0
        self.steps = model.config.total_ut_steps
        self.cache = model.make_cache(batch_size, max_len, self.steps)
        self.position: torch.Tensor | None = None

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.length = 0
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        out = self.model.run_steps(ids, positions, None, self.cache, self.steps)
        self.position = positions[:, -1:] + 1
        return self.model.readout(out, self.policy, position=-1)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.decode_step(token.reshape(-1, 1), self.position, None, self.cache, self.steps, self.policy)
        self.position = self.position + 1
        return out

    def kv_bytes_read_per_step(self) -> int:
        """K and V bytes the last step read: the positions written so far, in every slot."""
        return self.cache.bytes_per_decoded_token() * self.cache.length


def measure_decode(model: OuroForCausalLM, batch: int, options: CudaBenchOptions, device: torch.device,
                   fuse: bool = False) -> dict:
    """Prefill `repeats` + 1 times (the first untimed), then warmup and `repeats` timed decode windows.

    Greedy tokens are fed back on the device (argmax -> next step), so the timed loop never
    waits on the host."""
    timer = Timer(device)
    generator = torch.Generator().manual_seed(options.seed + batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, options.prompt_len), generator=generator).to(device)
    if options.mode == "dynamic":
        decoder = DynamicDecoder(model, batch, options.cache_len())
    else:
        decoder = StaticDecoder(model, batch, options.cache_len(), mode=options.mode,
                                compile_mode=options.compile_mode, attention=options.attention, fuse_projections=fuse,
                                compile_options=options.inductor_options)
    prefill_s = []
    for run in range(options.repeats + 1):
        timer.start()
        logits, _ = decoder.prefill(prompt)
        seconds = timer.stop()
        if run:
            prefill_s.append(seconds)
    token = logits.argmax(-1)
    for _ in range(options.warmup_steps):
        token = decoder.step(token)[0].argmax(-1)
    windows = []
    for _ in range(options.repeats):
        timer.start()
        for _ in range(options.new_tokens):
            token = decoder.step(token)[0].argmax(-1)
        windows.append(timer.stop())
    per_seq = [options.new_tokens / s for s in windows]
    row = {
        "batch": batch,
        "status": "ok",
        "attention": options.attention,
        "fused_projections": fuse,
        "cache_len": options.cache_len(),
        "setup_seconds": decoder.setup_seconds,
        "prefill_tok_s": spread([batch * options.prompt_len / s for s in prefill_s]),
        "window_seconds": windows,
        "tok_s_per_seq": spread(per_seq),
        "tok_s_aggregate": spread([batch * t for t in per_seq]),
        "ms_per_step": spread([1000 * s / options.new_tokens for s in windows]),
        "kv_bytes_per_step": decoder.kv_bytes_read_per_step(),
    }
    if options.profile_steps:
        row["profile"] = profile_decode(decoder, token, options.profile_steps, device)
    return row


def run_static_bench(options: CudaBenchOptions, device: torch.device, log: Log | None = None) -> dict:
    """Every phase on `device`; returns one JSON-ready dict. `run_cuda_bench` is the CUDA entry."""
    options.check()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    began = time.perf_counter()
    info = device_info(device)
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": info,
                    "options": asdict(options), "cache_len": options.cache_len(),
                    "datasheet_gb_s": datasheet_gb_s(info["name"])}
    log(f"bandwidth: {options.bandwidth_mib} MiB buffer on {info['name']}")
    result["bandwidth"] = measure_bandwidth(device, options.bandwidth_mib, options.bandwidth_repeats)
    read_gb_s = result["bandwidth"]["read_gb_s"]["median"]
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the bandwidth buffers back before the model is built
    rows, sizes = [], {}
    for dtype in options.dtypes:
        log(f"model: {options.shape} shape, {dtype}, random weights on {device}")
        model: OuroForCausalLM | None = build_random_model(options.shape, device, options.seed)
        status = "ok"
        if dtype == "int4":
            model, status = quantize_int4(model, options.int4_group_size)
        if model is None:
            log(f"{dtype}: {status}")
            rows += [{"dtype": dtype, "batch": b, "status": status} for b in options.batch_sizes]
            continue
        sizes[dtype] = decode_bytes(model)
        with torch.no_grad():
            for batch in options.batch_sizes:
                log(f"decode: {dtype}, batch {batch}, prompt {options.prompt_len}, mode {options.mode}")
                try:
                    # Fusing concatenates plain weights; quantized projections keep their own kernels.
                    row = measure_decode(model, batch, options, device, fuse=options.fuse_projections and dtype != "int4")
                except (RuntimeError, LooplmError) as exc:  # e.g. out of memory, a kernel the dtype lacks
                    rows.append({"dtype": dtype, "batch": batch, "status": f"failed: {type(exc).__name__}: {exc}"})
                    continue
                row.update(dtype=dtype, weight_bytes_per_step=sizes[dtype]["bytes_per_decoded_token"])
                rows.append(add_roofline(row, read_gb_s, result["datasheet_gb_s"]))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result.update(model_bytes=sizes, rows=rows, target=target_check(rows), total_seconds=time.perf_counter() - began)
    return result


def run_cuda_bench(options: CudaBenchOptions | None = None, log: Log | None = None) -> dict:
    """`looplm bench --device cuda`: refuses with a one-line `ConfigError` when CUDA is unavailable."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise ConfigError(reason)
    return run_static_bench(options or CudaBenchOptions(), torch.device("cuda"), log)


# ---------------------------------------------------------------------------------------------
# Command line (`python -m looplm.bench_cuda`), until `looplm bench --device cuda` calls it


def build_parser() -> argparse.ArgumentParser:
    defaults = CudaBenchOptions()
    parser = argparse.ArgumentParser(prog="python -m looplm.bench_cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=defaults.shape)
    parser.add_argument("--dtypes", default=",".join(defaults.dtypes), help="comma-separated: bf16,int4")
    parser.add_argument("--batch-sizes", default=",".join(map(str, defaults.batch_sizes)))
    for name in ("prompt_len", "new_tokens", "repeats", "warmup_steps", "bandwidth_mib", "int4_group_size", "seed",
                 "profile_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--mode", choices=BENCH_MODES, default=defaults.mode,
                        help="dynamic (generate's default decode step) or a static-step mode")
    parser.add_argument("--compile-mode", default=defaults.compile_mode)
    parser.add_argument("--attention", choices=ATTENTIONS, default=defaults.attention,
                        help="static-step attention: sdpa, matmul, or flex (FlexAttention; CUDA, compile modes)")
    parser.add_argument("--fuse-projections", action="store_true",
                        help="q|k|v and gate|up as one GEMM each in bf16 rows (copies those weights)")
    parser.add_argument("--inductor-option", action="append", default=[], metavar="NAME=VALUE",
                        help="an Inductor config override for the compile modes, repeatable, e.g. "
                             "coordinate_descent_tuning=true (true/false, numbers, else a string)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                        help="print saved runs (--json-out files) side by side, speed-ups against the first; "
                             "runs nothing, needs no GPU")
    return parser


def parse_inductor_options(pairs: Sequence[str]) -> dict:
    """`["coordinate_descent_tuning=true", "triton.max_tiles=3"]` -> `{name: True, name: 3}`."""
    options: dict = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--inductor-option takes NAME=VALUE, got {pair!r}")
        value: object = {"true": True, "false": False}.get(text.strip().lower(), text.strip())
        if isinstance(value, str):
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    pass
        options[name.strip()] = value
    return options


def options_from_args(args: argparse.Namespace) -> CudaBenchOptions:
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    return CudaBenchOptions(shape=args.shape, dtypes=dtypes, batch_sizes=batch_sizes, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, repeats=args.repeats, warmup_steps=args.warmup_steps,
                            mode=args.mode, compile_mode=args.compile_mode, bandwidth_mib=args.bandwidth_mib,
                            int4_group_size=args.int4_group_size, seed=args.seed, profile_steps=args.profile_steps,
                            attention=args.attention, fuse_projections=args.fuse_projections,
                            inductor_options=parse_inductor_options(args.inductor_option))


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the report, and as the last stdout line the JSON document; 1 on a LooplmError."""
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            print(compare_table([read_saved_run(Path(name)) for name in args.compare]))
            return 0
        check_writable(args.json_out, "--json-out")
        result = run_cuda_bench(options_from_args(args))
    except LooplmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    document = json.dumps(result, separators=(",", ":"))
    print(document, flush=True)
    if args.json_out:
        return exit_code_of(lambda: write_result(args.json_out, document + "\n", PRINTED_ABOVE))
    return 0


__all__ = ["CudaBenchOptions", "add_roofline", "build_random_model", "compare_table", "cuda_unavailable_reason",
           "format_report", "main", "markdown_table", "run_cuda_bench", "run_static_bench"]


if __name__ == "__main__":
    raise SystemExit(main())
