"""`looplm inspect`: config, parameter count, memory estimates, tokenizer and tensors of a model."""

import dataclasses
import json
from typing import Annotated, Optional

from rich.table import Table

from looplm.cli import common

TENSORS_SHOWN = 20


def summary(lm) -> dict:  # noqa: ANN001
    config = lm.config
    params = sum(p.numel() for p in lm.parameters())  # a tied lm_head is counted once
    quantized = [m for m in lm.modules() if hasattr(m, "in_features") and not list(m.parameters(recurse=False))]
    params += sum(m.in_features * m.out_features for m in quantized)  # looplm.quant layers hold buffers
    spec = getattr(lm, "quantization", None)
    # K and V, for every (UT step, layer) slot; the shared mode keeps one per layer for decoded tokens.
    kv_per_token = common.kv_bytes(lm, "full")
    kv_shared = common.kv_bytes(lm, "shared")
    tok = lm.tokenizer
    return {
        "model": lm.source,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        "config_defaults": config_defaults(lm),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "parameters": params,
        "quantization": None if spec is None else spec.to_json(),
        "loaded_bytes": sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()]),
        "weight_bytes": weight_bytes(lm, params),
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_per_token_shared": kv_shared,
        "kv_bytes_full_context": kv_per_token * config.max_position_embeddings,
        "kv_slots": config.num_kv_slots,
        "stop_ids": sorted(lm.stop_ids),
        "pad_id": lm.generation_defaults.get("pad_token_id", config.pad_token_id),
        "tokenizer": None if tok is None else {
            "vocab_size": tok.vocab_size, "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token,
            "special_ids": len(tok.special_ids),
            "chat_template": "model's own" if tok.chat_template else "ChatML (built-in)",
        },
        "runtime": runtime(lm),
        "tensors": [
            {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in stored_tensors(lm)
        ],
    }


def config_defaults(lm) -> list[str]:  # noqa: ANN001
    """The `looplm.config.DEFAULTED_KEYS` the model directory's config.json does not set (so a default is used)."""
    from pathlib import Path

    from looplm.config import DEFAULTED_KEYS

    path = Path(lm.source) / "config.json"
    if not path.is_file():  # the embedded model, a GGUF file, a hub id
        return []
    raw = json.loads(path.read_text(encoding="utf-8"))
    return [key for key in DEFAULTED_KEYS if key not in raw]


def weight_bytes(lm, params: int) -> dict[str, int | None]:  # noqa: ANN001
    """The weights' size in each form: every parameter in fp32 or bf16; for int8 and int4 (group
    128), the layer projections as `looplm quantize` stores them (scales and minimums included)
    and everything else (embeddings, lm_head, norms, exit gate) in bf16, as it keeps them. int4 is
    None where group 128 does not divide a projection's inputs (quantize refuses that)."""
    import torch

    from looplm.kernels.swap import is_layer_projection
    from looplm.quant.model import QuantSpec, expected_shapes

    projections = [(m.out_features, m.in_features) for name, m in lm.named_modules()
                   if is_layer_projection(name) and hasattr(m, "in_features")]
    rest = params - sum(out * inp for out, inp in projections)
    sizes = {"fp32": 4 * params, "bf16": 2 * params}
    for name, spec in (("int8", QuantSpec(8)), ("int4", QuantSpec(4, 128))):
        if spec.bits == 4 and any(inp % spec.group_size for _, inp in projections):
            sizes[name] = None
            continue
        stored = sum(torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                     for out, inp in projections for shape, dtype in expected_shapes(out, inp, spec).values())
        sizes[name] = stored + 2 * rest
    return sizes


def stored_tensors(lm) -> list:  # noqa: ANN001
    """(name, tensor) of every weight the model holds: parameters, and the quantized layers'
    buffers (qweight, scales, mins), which named_parameters leaves out."""
    tensors = dict(lm.named_parameters())
    for module_name, module in lm.named_modules():
        if hasattr(module, "in_features") and not list(module.parameters(recurse=False)):
            tensors.update({f"{module_name}.{name}": t for name, t in module.named_buffers(recurse=False)})
    return sorted(tensors.items(), key=lambda item: _natural(item[0]))


def _natural(name: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def runtime(lm) -> dict:  # noqa: ANN001
    """What would run the model here: looplm's CPU kernels (which path) or torch ops, and the CPU
    threads a command would use now (`looplm.cpu_load`: the free cores)."""
    import torch

    from looplm.cpu_load import allowed_cpus, free_cores_now

    default = torch.get_num_threads()
    choice = free_cores_now(allowed_cpus())  # None: OMP_NUM_THREADS or one thread, nothing measured
    return {"kernels": getattr(lm, "kernels", None), "default_threads": default,
            "other_busy_cores": None if choice is None else choice.busy_cores,
            "threads": default if choice is None or choice.threads is None else choice.threads}


def _kernels_line(kernels: dict | None) -> str:
    if not kernels:
        return "torch ops"
    quantized = [f"{kernels[key]} {name}" for name, key in (("int8", "int8_linears"), ("int4", "int4_linears"))
                 if kernels.get(key)]
    return f"looplm {kernels['kernel']} (prefill {kernels['prefill']})" + (f", {', '.join(quantized)}" if quantized else "")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(title: str, rows: list[tuple], headers: tuple = ("", "")) -> Table:
    table = Table(title=title, title_justify="left", show_header=bool(headers[0]), header_style="bold")
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


@common.app.command()
def inspect(
    model: common.Model = None,
    dtype: common.Dtype = "bfloat16",
    device: common.Device = "cpu",
    steps: common.Steps = None,
    quant: common.Quant = None,
    group_size: common.GroupSize = None,
    tensors: Annotated[Optional[bool], common.option(
        f"List every tensor / none (default: the first {TENSORS_SHOWN}; all with --json).",
        "--tensors/--no-tensors", default_in_help=True,
    )] = None,
    as_json: Annotated[bool, common.option("Print one JSON object.", "--json")] = False,
) -> None:
    """Show a model's config, size, KV-cache cost, stop ids, tokenizer, runtime and tensors."""
    info = summary(common.load_model(model, dtype, device, steps, quant, group_size))
    shown = info["tensors"]
    if tensors is False:
        shown = []
    elif tensors is None and not as_json:
        shown = shown[:TENSORS_SHOWN]
    if as_json:
        print(json.dumps({**info, "tensors": shown}))
        return
    out = common.stdout()
    quantized = info["quantization"]
    group = f" g{quantized['group_size']}" if quantized and quantized.get("group_size") else ""
    weights = f"int{quantized['bits']}{group} layers, {info['dtype']}" if quantized else info["dtype"]
    title = f"{info['model']} ({weights}, {info['device']})"
    defaulted = set(info["config_defaults"])
    rows = [(key, f"{value} (default: not in config.json)" if key in defaulted else value)
            for key, value in info["config"].items()]
    out.print(_table(title, rows, ("config", "value")))
    kv_dtype = info["dtype"]
    out.print(_table("size", [
        ("parameters", f"{info['parameters']:,}"),
        *((f"weights {name} (est.)", "-" if n is None else _size(n)) for name, n in info["weight_bytes"].items()),
        (f"KV bytes per token ({kv_dtype})", f"{info['kv_bytes_per_token']:,}"),
        ("KV bytes per decoded token, --kv-mode shared", f"{info['kv_bytes_per_token_shared']:,}"),
        (f"KV at {info['config']['max_position_embeddings']:,} tokens", _size(info["kv_bytes_full_context"])),
        ("KV slots (steps x layers)", info["kv_slots"]),
    ]))
    tok = info["tokenizer"]
    out.print(_table("tokens", [
        ("stop ids", ", ".join(map(str, info["stop_ids"])) or "none"),
        ("pad id", info["pad_id"]),
        *([(f"tokenizer {k}", v) for k, v in tok.items()] if tok else [("tokenizer", "none (token ids only)")]),
    ]))
    run = info["runtime"]
    busy = "not measured" if run["other_busy_cores"] is None else f"{run['other_busy_cores']:.1f}"
    out.print(_table("runtime", [
        ("CPU kernels", _kernels_line(run["kernels"])),
        ("threads a command would use now", f"{run['threads']} of {run['default_threads']}"),
        ("cores other processes keep busy", busy),
    ]))
    if shown:
        rows = [(t["name"], tuple(t["shape"]), t["dtype"]) for t in shown]
        out.print(_table("tensors", rows, ("name", "shape", "dtype")))
    if len(shown) < len(info["tensors"]):
        out.print(f"{len(info['tensors'])} tensors in all; --tensors lists every one", style="dim")
