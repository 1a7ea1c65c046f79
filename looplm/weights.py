"""An HF-layout directory's float weights: find its safetensors files, build the model on the
meta device, and read every parameter straight into its final dtype and place.

Shared by `looplm.loading` (float checkpoints) and `looplm.quant.checkpoint` (whose float
tensors, everything but the quantized projections, load exactly as in a float checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from looplm.config import OuroConfig, read_json
from looplm.errors import CheckpointError
from looplm.models.ouro import OuroForCausalLM
from looplm.safetensors_io import TensorEntry, index_file, read_into

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffer some exports include


def index_weights(path: Path, quantized: bool = False) -> dict[str, TensorEntry]:
    index_json = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index_json.exists():
        weight_map = read_json(index_json).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_json}: missing 'weight_map'")
        files = sorted(set(weight_map.values()))
        for name in files:  # shards sit beside the index: never open a path it points elsewhere
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(f"{index_json}: weight_map names {name!r}, not a file in the model directory")
    elif single.exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle weights found ({', '.join(pickles[:3])}); looplm loads safetensors or GGUF "
                "only, never pickle: convert the checkpoint to safetensors first"
            )
        raise CheckpointError(f"{path}: no model.safetensors (or sharded *.safetensors with an index) found")
    entries: dict[str, TensorEntry] = {}
    for name in files:
        for tensor_name, entry in index_file(path / name, quantized).items():
            if tensor_name in entries:
                raise CheckpointError(f"{path / name}: tensor '{tensor_name}' is also in {entries[tensor_name].path.name}")
            entries[tensor_name] = entry
    return entries


def check_layer_count(config: OuroConfig, entries: dict[str, TensorEntry], path: Path) -> None:
    """The config's num_hidden_layers against the layers the weights hold, before a model is built
    (a config that says 10**9 layers took minutes of building, then failed)."""
    layers = {int(parts[2]) for parts in (name.split(".") for name in entries)
              if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()}
    if not layers:  # not a count mismatch (the config holds at least one layer): the tensors are named another way
        sample = ", ".join(sorted(entries)[:3]) or "no tensors"
        raise CheckpointError(f"{path}: no 'model.layers.N.*' tensors, the Ouro/HF layout's names (found {sample}); "
                              "is this checkpoint in another layout?")
    count = config.num_hidden_layers
    if len(layers) != count or max(layers) != count - 1:  # distinct ints: 0..count-1 exactly
        raise CheckpointError(f"{path}: config.json says num_hidden_layers {count}, the weights hold layers "
                              f"{len(layers)} (indices {min(layers)}-{max(layers)})")


def empty_model(config: OuroConfig, dtype: torch.dtype, device: torch.device,
                entries: dict[str, TensorEntry] | None = None, path: Path | None = None) -> OuroForCausalLM:
    """The model with uninitialised weights; given the checkpoint's `entries`, their names and shapes
    are checked first, on the meta device, so a config whose sizes disagree with the weights (a
    hidden_size of 10**12) is an error before any memory is taken."""
    with torch.device("meta"):
        model = OuroForCausalLM(config)
    if entries is not None:
        for name, param in _expected_entries(model, entries, path):
            if tuple(param.shape) != entries[name].shape:
                entry = entries[name]
                raise CheckpointError(f"{entry.path}: tensor '{name}' has shape {list(entry.shape)}, the config "
                                      f"expects {list(param.shape)}")
    materialize(model, dtype, device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def materialize(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give every meta-device parameter and buffer uninitialised memory on `device`, floats in `dtype`.

    `Module.to_empty` does the same through torch's reference ops for meta tensors, whose first
    use imports torch.fx's symbolic shapes: half a second of every command's start-up. Tied
    parameters come out untied; callers tie them again."""
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            kind = dtype if tensor.is_floating_point() else tensor.dtype
            empty = torch.empty(tensor.shape, dtype=kind, device=device)
            if isinstance(tensor, nn.Parameter):
                empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
            setattr(module, name, empty)


def _expected_entries(model: OuroForCausalLM, entries: dict[str, TensorEntry],
                      path: Path | None) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters paired by name with the checkpoint's tensors; a CheckpointError when
    one is missing or the checkpoint has one the config does not."""
    expected = dict(model.named_parameters())  # tied lm_head is listed once, as the embedding
    entries = {k: v for k, v in entries.items() if not k.endswith(IGNORED_TENSOR_SUFFIXES)}
    if model.config.tie_word_embeddings:
        entries.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the weights, e.g. '{missing[0]}'")
    if extra:
        raise CheckpointError(
            f"{entries[extra[0]].path}: {len(extra)} unexpected tensor(s) for this config, e.g. '{extra[0]}'"
        )
    return list(expected.items())


def fill_weights(model: OuroForCausalLM, entries: dict[str, TensorEntry], path: Path) -> None:
    with torch.no_grad():
        for name, param in _expected_entries(model, entries, path):
            read_into(entries[name], param.data)
