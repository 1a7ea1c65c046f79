"""Write a quantized checkpoint (`looplm quantize`): load a float model, quantize its layer
projections into the portable on-disk form, and save it as an HF-style directory beside the
source's tokenizer and generation files (the format: docs/quantization.md; reading it back:
`looplm.quant.checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from looplm.config import OuroConfig, read_json
from looplm.default_model import default_model_dir
from looplm.errors import QuantizationError
from looplm.loading import load, resolve_path
from looplm.models.ouro import OuroForCausalLM
from looplm.quant.checkpoint import QUANT_CONFIG_KEY
from looplm.quant.model import QuantSpec, check_shape, portable_tensors
from looplm.safetensors_io import save_safetensors

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "chat_template.jinja")


def save_quantized(source: str | None, output: Path, spec: QuantSpec, dtype: str = "bfloat16",
                   overwrite: bool = False, report: Callable[[str], None] | None = None) -> Path:
    """Quantize the model at `source` (directory, hub id, .gguf, None = default) into `output`.

    A directory that already holds a model is refused unless `overwrite`; then its weights,
    config and tokenizer files are replaced (other files stay). The files are written to a
    staging directory beside `output` and moved in at the end, so a failed or interrupted run
    leaves `output` as it was. `report` is told each stage ("loading", "quantizing 3/168", "writing")."""
    output = Path(output)
    source_path = _source_path(source)
    if output.resolve() == source_path.resolve():
        raise QuantizationError(f"{output}: the output directory must differ from the source model")
    _check_output(output, overwrite)
    staging = _make_staging_dir(output)  # before the model loads, so an unwritable place fails first
    try:
        report = report or (lambda stage: None)
        report("loading")
        model = load(source, dtype=dtype)
        raw = read_json(source_path / "config.json") if source_path.is_dir() else _config_dict(model.config)
        if raw.get(QUANT_CONFIG_KEY) is not None:
            raise QuantizationError(f"{source}: the model is already quantized")
        tensors = quantized_state_dict(model, spec, lambda done, total: report(f"quantizing {done}/{total}"))
        report("writing")
        raw[QUANT_CONFIG_KEY] = spec.to_json()
        raw["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        try:
            save_safetensors(tensors, staging / "model.safetensors")
            (staging / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
            _copy_side_files(model, source_path, staging)
            _move_into(staging, output)
        except OSError as exc:  # a full disk, or a directory that changed under us
            raise QuantizationError(f"could not write {output} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _make_staging_dir(output: Path) -> Path:
    """An empty directory beside `output` to write into; moved into place when complete."""
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # not tempfile.mkdtemp: its 0700 would become the output directory's mode
    except OSError as exc:
        raise QuantizationError(f"{output}: cannot write there ({exc.strerror or exc})") from None
    return staging


def _model_files(directory: Path) -> list[str]:
    """The files of `directory` that make up a model (weights, config, tokenizer)."""
    names = set(COPIED_FILES) | {"config.json", "model.safetensors.index.json"}
    return sorted(p.name for p in directory.iterdir() if p.name in names or p.suffix == ".safetensors")


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise QuantizationError(f"{output}: exists and is not a directory")
    found = _model_files(output) if output.is_dir() else []
    if found and not overwrite:
        raise QuantizationError(f"{output} already holds model files ({', '.join(found[:3])}): --overwrite "
                                "replaces them, or choose another -o")


def _move_into(staging: Path, output: Path) -> None:
    """Put the staged files in place: one rename for a new directory, else file by file, after
    removing the old model's files (a stale shard index would otherwise win over the new weights)."""
    if not output.exists():
        os.replace(staging, output)
        return
    for name in _model_files(output):
        (output / name).unlink()
    for path in staging.iterdir():
        os.replace(path, output / path.name)


def quantized_state_dict(model: OuroForCausalLM, spec: QuantSpec,
                         progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    """Portable tensors for the selected linears, the model's own tensors for everything else.
    Each float weight is released once quantized, so memory stays near the float model's size.
    `progress(done, total)` follows the linears."""
    selected = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and spec.selects(name)}
    for name, linear in selected.items():
        check_shape(name, linear.out_features, linear.in_features, spec)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for done, (name, linear) in enumerate(selected.items(), 1):
            for suffix, tensor in portable_tensors(name, linear.weight, spec).items():
                out[f"{name}.{suffix}"] = tensor.contiguous()
            linear.weight.data = torch.empty(0, dtype=linear.weight.dtype)  # free the float copy
            if progress is not None:
                progress(done, len(selected))
        skip = {f"{name}.weight" for name in selected}
        for name, param in model.named_parameters():  # a tied lm_head is listed once, as the embedding
            if name not in skip:
                out[name] = param.detach().contiguous()
    return out


def _source_path(source: str | None) -> Path:
    return default_model_dir() if source is None else resolve_path(source)


def _config_dict(config: OuroConfig) -> dict:
    """config.json for a model that came without one (a GGUF file)."""
    raw = {k: v for k, v in vars(config).items() if v is not None}
    raw["eos_token_id"] = list(raw.pop("eos_token_ids", ()))
    raw["architectures"] = ["OuroForCausalLM" if config.model_type == "ouro" else "LlamaForCausalLM"]
    return raw


def _copy_side_files(model: OuroForCausalLM, source: Path, output: Path) -> None:
    if source.is_dir():
        for name in COPIED_FILES:
            if (source / name).exists():
                shutil.copyfile(source / name, output / name)
        return
    if model.tokenizer is not None:  # GGUF: the tokenizer lives in the file
        model.tokenizer.save(output)
    generation = {k: v for k, v in model.generation_defaults.items() if k in ("eos_token_ids", "pad_token_id")}
    generation = {"eos_token_id": generation.get("eos_token_ids"), "pad_token_id": generation.get("pad_token_id")}
    (output / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
