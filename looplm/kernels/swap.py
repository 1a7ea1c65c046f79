"""Swap `nn.Linear` modules of a loaded model for faster or smaller equivalents.

Every inference fast path (prepacked bf16 weights, int8, int4) is a module that takes the
place of an `nn.Linear` and computes the same `x @ W.T`. They all go in through
`replace_linears`, so the model code never knows which kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# The seven projections inside each decoder layer: the bulk of the weights and of decode time.
LAYER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_layer_projection(name: str) -> bool:
    """True for `model.layers.N.<attn|mlp>.<projection>`; False for lm_head and the exit gate."""
    return name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in LAYER_PROJECTIONS


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module | None],
    include_tied: bool = False,
) -> list[str]:
    """Call `make(name, linear)` for every `nn.Linear` in `model` and put its result in the
    linear's place; `None` keeps the original. Returns the names that were replaced.

    Tied weights (lm_head sharing the embedding) are left alone unless `include_tied`: a
    replacement that stores its own weights would silently untie them. Pass `include_tied`
    only when `make` reuses the original Parameter object."""
    tied = set() if include_tied else _tied_parameter_ids(model)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or id(module.weight) in tied:
            continue
        new = make(name, module)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced.append(name)
    return replaced


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}
