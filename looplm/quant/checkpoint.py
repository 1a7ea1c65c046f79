"""Quantized checkpoints: load a directory into a quantized model one linear at a time (the
on-disk form: docs/quantization.md; writing one: `looplm.quant.export`).

Both loading routes build the model on the meta device, give real memory only to what is not
quantized, then make each quantized module from one linear's tensors at a time: read from a
quantized checkpoint, or read as a float weight and quantized on the spot. So peak memory is
the quantized model plus one float matrix, never the whole float model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from looplm.config import OuroConfig
from looplm.errors import CheckpointError, QuantizationError
from looplm.kernels.swap import replace_linears
from looplm.models.ouro import OuroForCausalLM
from looplm.quant.model import QuantSpec, check_shape, expected_shapes, module_from_portable, portable_tensors
from looplm.safetensors_io import TensorEntry, read_into
from looplm.weights import fill_weights, materialize

QUANT_CONFIG_KEY = "quantization_config"


def stored_spec(raw_config: dict, source: Path) -> QuantSpec | None:
    """The spec in a config.json's `quantization_config`, or None for a float checkpoint."""
    block = raw_config.get(QUANT_CONFIG_KEY)
    if block is None:
        return None
    if not isinstance(block, dict) or block.get("quant_method") != "looplm":
        raise CheckpointError(f"{source}: quantization_config {block!r} is not a looplm quantized checkpoint")
    if block.get("format_version") != 1:
        raise CheckpointError(f"{source}: quantized format version {block.get('format_version')!r} is not supported")
    try:
        return QuantSpec(int(block["bits"]), int(block.get("group_size") or 128))
    except (KeyError, TypeError, ValueError, QuantizationError) as exc:
        raise CheckpointError(f"{source}: bad quantization_config ({exc})") from None


class _Pending(nn.Module):
    """Holds a quantized linear's place (and shape) while the rest of the model is allocated."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.out_features, linear.in_features
        if linear.bias is not None:  # no quantized projection in Ouro/Llama has a bias
            raise QuantizationError("quantizing a linear with a bias is not supported")


def load_quantized(
    path: Path,
    config: OuroConfig,
    entries: dict[str, TensorEntry],
    dtype: torch.dtype,
    device: torch.device,
    spec: QuantSpec,
    stored: bool,
    int4_layout: str | None = None,
) -> OuroForCausalLM:
    """A quantized model from a directory: `stored` reads quantized tensors, else quantizes float ones.
    `int4_layout` picks the in-memory int4 layout (`Int4Linear`); the files are the same."""
    with torch.device("meta"):
        model = OuroForCausalLM(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    pending: dict[str, _Pending] = {}

    def hold(name: str, linear: nn.Linear) -> nn.Module | None:
        if not spec.selects(name):
            return None
        check_shape(name, linear.out_features, linear.in_features, spec)
        pending[name] = _Pending(linear)
        return pending[name]

    replace_linears(model, hold)
    materialize(model, dtype, device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    suffixes = tuple(expected_shapes(1, spec.group_size, spec)) if stored else ("weight",)
    consumed = {f"{name}.{suffix}" for name in pending for suffix in suffixes}
    fill_weights(model, {k: v for k, v in entries.items() if k not in consumed}, path)
    with torch.no_grad():
        for name, slot in pending.items():
            if stored:
                tensors = _read_stored(path, name, slot, entries, spec)
            else:
                weight = torch.empty(slot.out_features, slot.in_features, dtype=dtype, device=device)
                read_into(_entry(path, entries, f"{name}.weight"), weight)
                tensors = portable_tensors(name, weight, spec)
                del weight
            tensors = {k: v.to(device) for k, v in tensors.items()}
            parent, _, child = name.rpartition(".")
            module = module_from_portable(tensors, spec, None, dtype, int4_layout)
            setattr(model.get_submodule(parent) if parent else model, child, module)
    model.quantization = spec
    return model


def _entry(path: Path, entries: dict[str, TensorEntry], key: str) -> TensorEntry:
    if key not in entries:
        raise CheckpointError(f"{path}: tensor '{key}' missing from the weights")
    return entries[key]


def _read_stored(
    path: Path, name: str, slot: _Pending, entries: dict[str, TensorEntry], spec: QuantSpec
) -> dict[str, torch.Tensor]:
    tensors = {}
    for suffix, (shape, dtype) in expected_shapes(slot.out_features, slot.in_features, spec).items():
        entry = _entry(path, entries, f"{name}.{suffix}")
        if entry.dtype != dtype or entry.shape != shape:
            raise CheckpointError(
                f"{entry.path}: tensor '{entry.name}' is {str(entry.dtype).removeprefix('torch.')} {list(entry.shape)}, "
                f"the {spec.bits}-bit format expects {str(dtype).removeprefix('torch.')} {list(shape)}"
            )
        tensors[suffix] = torch.empty(shape, dtype=dtype)
        read_into(entry, tensors[suffix])
    return tensors


def check_requested(path: Path, stored: QuantSpec, requested: QuantSpec | None) -> None:
    """Loading a quantized checkpoint with `quant=` is fine only if it asks for what is stored."""
    if requested is None or (requested.bits, requested.group_size) == (stored.bits, stored.group_size):
        return
    have = f"int{stored.bits}" + (f" (group size {stored.group_size})" if stored.bits == 4 else "")
    raise QuantizationError(
        f"{path}: the checkpoint is already quantized to {have}; load it without a quant option "
        "or quantize the float model instead"
    )
