"""Linear layers that read the same input (q/k/v; gate/up), run together.

A layer pass runs seven projections, and decode runs 4 x 24 = 96 layer passes per token on
Ouro-1.4B, so each module call's Python cost (about 10 us: `nn.Module.__call__`, the
forward's dispatch checks, reshapes) adds up to milliseconds per token next to GEMVs of
tens to hundreds of microseconds. A group calls looplm's decode kernel for each member
directly, the same calls the modules would make, so the results are the same bits.

Decode only: prefill (more than 8 rows) runs the modules. On the fp32 prefill route one
wider GEMM over the members' upcast weights measured no faster in a model (0.97x, AVX2
emulated, one process) and needed twice the upcast buffer, so it was left out.

The members keep their own weights: nothing is concatenated in memory, state dicts are
unchanged, and the modules still run alone (training, other devices and dtypes).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from looplm.quant.linear import FUSED_MAX_ROWS, Int4Linear, Int8Linear


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, Int8Linear):
        return "int8" if module.decode_kernel is not None and module.bias is None else None
    if isinstance(module, Int4Linear):
        usable = module.layout == "looplm" and module.cpu_kernels is not None and module.bias is None
        return "int4" if usable else None
    if isinstance(module, nn.Linear) and module.bias is None and module.weight.dtype == torch.bfloat16:
        return "bf16"
    return None


class SharedInputGroup:
    """Projections of one input (attributes `names` of `owner`), as a callable returning their
    outputs, or None where the group does not apply (then the caller runs the modules)."""

    def __init__(self, owner: nn.Module, names: Sequence[str], kind: str, kernels: ModuleType) -> None:
        self.owner = owner
        self.names = list(names)
        self.members = [getattr(owner, name) for name in names]
        self.kind = kind
        self.kernels = kernels
        self.in_features = self.members[0].in_features

    @classmethod
    def build(cls, owner: nn.Module, names: Sequence[str], kernels: ModuleType) -> SharedInputGroup | None:
        """A group when every member can take the group's path (same kind, same input width,
        no bias), else None."""
        members = [getattr(owner, name) for name in names]
        kinds = {_kind(m) for m in members}
        if len(kinds) != 1 or None in kinds or len({m.in_features for m in members}) != 1:
            return None
        return cls(owner, names, kinds.pop(), kernels)

    def current(self) -> bool:
        """Whether the owner still holds these members (a module swapped in later, by
        quantization say, is not this group's to run)."""
        modules = self.owner._modules  # the dict behind getattr: decode checks this per call
        return all(modules.get(name) is member for name, member in zip(self.names, self.members, strict=True))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        if x.dtype != torch.bfloat16 or not x.is_cpu or torch.is_grad_enabled() or not self.current():
            return None
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > FUSED_MAX_ROWS:  # the decode kernels' row limit
            return None
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in self.decode(rows.contiguous())]

    def _tensors(self, member: nn.Module) -> tuple[dict, list[str]]:
        """The dict the member's kernel tensors live in, and their keys, for this group's kind."""
        if self.kind == "bf16":
            return member._parameters, ["weight"]
        if self.kind == "int8":
            return member._buffers, ["weight_int8", "scale"]
        return member._buffers, ["weight_looplm", "scales_looplm", "mins_looplm"]

    def projections(self) -> list:
        """The members as the extension's `Projection`s (for `DecodeLayer`), made from the
        tensors they hold now; `snapshot` tells when those have been replaced since."""
        made = []
        for member in self.members:
            where, keys = self._tensors(member)
            tensors = [where[key] for key in keys]
            if self.kind == "int8":
                tensors[1] = member._scale_fp32()  # the kernel takes the scale in fp32
            made.append(self.kernels.make_projection(self.kind, tensors, getattr(member, "group_size", 0),
                                                     member.out_features))
        return made

    def snapshot(self) -> list[tuple[dict, str, torch.Tensor, int]]:
        """(dict, key, tensor, version) of every tensor `projections` read: a later load or
        in-place edit of a weight (an int8 scale is copied to fp32) makes them stale."""
        entries = []
        for member in self.members:
            where, keys = self._tensors(member)
            entries += [(where, key, where[key], where[key]._version) for key in keys]
        return entries

    def decode(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """The members' outputs `[M, N_i]` for contiguous bf16 rows `[M, K]`, M <= 8 (no checks).

        Weights are read from the modules' parameter and buffer dicts, not by attribute:
        `nn.Module.__getattr__` costs about a microsecond per lookup, and a layer pass made
        about thirty of them."""
        kernels = self.kernels
        if self.kind == "bf16":
            return [kernels.skinny_linear_bf16(rows, m._parameters["weight"]) for m in self.members]
        if self.kind == "int8":
            return [kernels.int8_dot_linear(rows, m._buffers["weight_int8"], m._scale_fp32()) for m in self.members]
        return [kernels.int4_dot_linear(rows, b["weight_looplm"], b["scales_looplm"], b["mins_looplm"], m.group_size,
                                        m.out_features)
                for m, b in ((m, m._buffers) for m in self.members)]
