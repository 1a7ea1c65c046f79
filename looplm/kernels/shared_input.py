"""Linear layers that read the same input (q/k/v; gate/up), run together.

A layer pass runs seven projections, and decode runs 4 x 24 = 96 layer passes per token on
Ouro-1.4B, so each module call's Python cost (about 10 us: `nn.Module.__call__`, the
forward's dispatch checks, reshapes) adds up to milliseconds per token next to GEMVs of
tens to hundreds of microseconds. A group calls looplm's decode kernel for each member
directly, the same calls the modules would make, so the results are the same bits.

On the fp32 prefill route (AVX2-only CPUs) a group upcasts its members' weights into one
fp32 buffer, one after another, and runs one wider GEMM: the input is upcast once instead of
three times, and q/k/v's three 2048-wide GEMMs become one 6144-wide GEMM, which oneDNN runs
faster (benchmarks/bench_prefill_gemm.py). fp32 accumulation either way; the bf16 route
keeps the modules, bit for bit the reference's GEMMs.

The members keep their own weights: nothing is concatenated in memory, state dicts are
unchanged, and the modules still run alone (training, other devices and dtypes).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from looplm.kernels.fp32_gemm import fp32_weight_buffer, linear_fp32
from looplm.quant.linear import Int4Linear, Int8Linear

MAX_DECODE_ROWS = 8  # the decode kernels' limit (looplm.kernels.cpu.MAX_SKINNY_ROWS)


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

    def __init__(self, owner: nn.Module, names: Sequence[str], kind: str, kernels: ModuleType,
                 prefill_route: str) -> None:
        self.owner = owner
        self.names = list(names)
        self.members = [getattr(owner, name) for name in names]
        self.kind = kind
        self.kernels = kernels
        self.prefill_route = prefill_route
        self.in_features = self.members[0].in_features
        self.sizes = [m.out_features for m in self.members]

    @classmethod
    def build(cls, owner: nn.Module, names: Sequence[str], kernels: ModuleType,
              prefill_route: str) -> SharedInputGroup | None:
        """A group when every member can take the group's path (same kind, same input width,
        no bias), else None."""
        members = [getattr(owner, name) for name in names]
        kinds = {_kind(m) for m in members}
        if len(kinds) != 1 or None in kinds or len({m.in_features for m in members}) != 1:
            return None
        return cls(owner, names, kinds.pop(), kernels, prefill_route)

    def current(self) -> bool:
        """Whether the owner still holds these members (a module swapped in later, by
        quantization say, is not this group's to run)."""
        return all(getattr(self.owner, name) is member for name, member in zip(self.names, self.members, strict=True))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        if x.dtype != torch.bfloat16 or not x.is_cpu or torch.is_grad_enabled() or not self.current():
            return None
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= MAX_DECODE_ROWS:
            outputs = self._decode(rows.contiguous())
        elif self.prefill_route == "fp32":
            outputs = self._prefill_fp32(rows)
        else:
            return None
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in outputs]

    def _decode(self, rows: torch.Tensor) -> list[torch.Tensor]:
        kernels = self.kernels
        if self.kind == "bf16":
            return [kernels.skinny_linear_bf16(rows, m.weight) for m in self.members]
        if self.kind == "int8":
            return [kernels.int8_dot_linear(rows, m.weight_int8, m._scale_fp32()) for m in self.members]
        return [kernels.int4_dot_linear(rows, m.weight_looplm, m.scales_looplm, m.mins_looplm, m.group_size)
                for m in self.members]

    def _prefill_fp32(self, rows: torch.Tensor) -> list[torch.Tensor]:
        weight = fp32_weight_buffer((sum(self.sizes), self.in_features))
        for member, part in zip(self.members, weight.split(self.sizes), strict=True):
            if self.kind == "bf16":
                part.copy_(member.weight)
            elif self.kind == "int8":
                part.copy_(member.weight_int8).mul_(member._scale_fp32()[:, None])
            else:
                self.kernels.int4_dequantize(member.weight_looplm, member.scales_looplm, member.mins_looplm,
                                             member.group_size, self.in_features, fp32_out=True, out=part)
        out = linear_fp32(rows.float(), weight).to(rows.dtype)
        return list(out.split(self.sizes, dim=-1))
