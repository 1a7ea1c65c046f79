"""One decoder layer's single-token decode pass as direct calls to looplm's CPU kernels.

Decode runs the layer stack once per UT step: 96 layer passes per token on Ouro-1.4B, 192 on
2.6B. Through the modules each pass makes about nine `nn.Module` calls and forty attribute
lookups on top of its ~20 kernel calls, and on an int4 model that Python work was about a
sixth of the token time (session-5 breakdown in docs/benchmarks.md). A plan holds what the
pass needs (the kernels, the norm weights, the projection groups) and makes the same kernel
calls the modules would, in the same order, so the result is the same bits.

With the whole batch in a full KV cache (plain decode), the pass runs as one C++ call
(`csrc/layer.cpp`: the same kernels in the same order, the K/V written into the cache by the
attention call). Measured against this Python version: 2-4 ms per token saved on the 1.4B
shape (about 2%, noise level), 1.3-1.5x on tiny-ouro, where the per-pass cost is a third of a
token. Row subsets (early-exited rows) and the shared-KV cache take the Python version.

A plan applies to bf16 CPU inference with a KV cache, one new token per row and at most 8
rows; anything else (prefill, training, fp32, a swapped module or norm weight) returns None
and the caller runs the modules. The plan takes its kernels from `use_cpu_kernels`: code that
later takes a kernel off a module by hand should clear `layer.decode_plan` too.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from looplm.cache import KVCache
from looplm.kernels.shared_input import SharedInputGroup
from looplm.quant.linear import FUSED_MAX_ROWS

if TYPE_CHECKING:
    from looplm.models.ouro import AttentionBias


# The layer's four norms in the order a pass applies them (Identity where it has none).
NORM_NAMES = ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2")


def _norms(layer: nn.Module) -> tuple[nn.Module, ...]:
    return tuple(getattr(layer, name) for name in NORM_NAMES)


def _norm_usable(module: nn.Module, rms_kernel: object) -> bool:
    """Whether the plan can run this norm: an Identity (no norm), or an RMSNorm on `rms_kernel`."""
    if isinstance(module, nn.Identity):
        return True
    return getattr(module, "kernel", None) is rms_kernel and module.weight.dtype == torch.bfloat16


def _norm_weight(module: nn.Module) -> torch.Tensor | None:
    return None if isinstance(module, nn.Identity) else module.weight


class LayerDecodePlan:
    """Callable as the layer: `plan(x, cos, sin, bias, cache, slot, rows)` -> new hidden state,
    or None where it does not apply."""

    def __init__(self, layer: nn.Module, kernels: ModuleType, groups: tuple[SharedInputGroup, ...]) -> None:
        self.layer = layer
        self.attn, self.mlp = layer.self_attn, layer.mlp
        self.qkv, self.o, self.gate_up, self.down = groups
        self.norm_modules = _norms(layer)
        self.norm_weights = tuple(_norm_weight(m) for m in self.norm_modules)
        self.eps = layer.input_layernorm.eps
        self.heads, self.kv_heads, self.head_dim = self.attn.num_heads, self.attn.num_kv_heads, self.attn.head_dim
        self.rms_norm, self.rope, self.attention = kernels.rms_norm_bf16, kernels.rope_bf16, kernels.decode_attention_bf16
        self.kernels = kernels
        self.native, self.native_tensors = self._build_native()

    def _build_native(self) -> tuple[object, list]:
        """The pass as one C++ object (`csrc/layer.cpp`) over the tensors the layer holds now,
        and a snapshot of those tensors to tell when it has gone stale."""
        groups = (self.qkv, self.o, self.gate_up, self.down)
        qkv, (o,), gate_up, (down,) = (g.projections() for g in groups)
        native = self.kernels.DecodeLayer(qkv, o, gate_up, down, list(self.norm_weights), self.eps, self.heads,
                                          self.kv_heads, self.head_dim)
        return native, [entry for g in groups for entry in g.snapshot()]

    def _native_current(self) -> bool:
        return all(where.get(key) is tensor and tensor._version == version
                   for where, key, tensor, version in self.native_tensors)

    @classmethod
    def build(cls, layer: nn.Module, kernels: ModuleType) -> LayerDecodePlan | None:
        """A plan when every piece of the layer has a kernel path, else None."""
        attn, mlp = layer.self_attn, layer.mlp
        groups = (SharedInputGroup.build(attn, ("q_proj", "k_proj", "v_proj"), kernels),
                  SharedInputGroup.build(attn, ("o_proj",), kernels),
                  SharedInputGroup.build(mlp, ("gate_proj", "up_proj"), kernels),
                  SharedInputGroup.build(mlp, ("down_proj",), kernels))
        norms = _norms(layer)
        eps = {m.eps for m in norms if not isinstance(m, nn.Identity)}
        usable = (None not in groups and len(eps) == 1
                  and all(_norm_usable(m, kernels.rms_norm_bf16) for m in norms)
                  and attn.decode_kernel is kernels.decode_attention_bf16 and attn.rope_kernel is kernels.rope_bf16)
        return cls(layer, kernels, groups) if usable else None

    def current(self) -> bool:
        """Whether the layer still holds the modules and weights this plan was built from
        (read from the modules' dicts: attribute lookups on modules cost about a microsecond)."""
        layer = self.layer._modules
        same = (layer["self_attn"] is self.attn and layer["mlp"] is self.mlp
                and all(layer[name] is m for name, m in zip(NORM_NAMES, self.norm_modules, strict=True)))
        if not same or not all(g.current() for g in (self.qkv, self.o, self.gate_up, self.down)):
            return False
        return all(w is None or (m._parameters.get("weight") is w and w.dtype == torch.bfloat16)
                   for m, w in zip(self.norm_modules, self.norm_weights, strict=True))

    def _norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        weight = self.norm_weights[index]
        return x if weight is None else self.rms_norm(x, weight, self.eps)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: AttentionBias,
                 cache: KVCache | None, slot: int, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        batch, seq, hidden = x.shape
        if (cache is None or seq != 1 or batch > FUSED_MAX_ROWS or x.dtype != torch.bfloat16 or not x.is_cpu
                or torch.is_grad_enabled() or not self.current()):
            return None
        position = cache.length
        if type(cache) is KVCache and rows is None and position < cache.max_len:
            # the whole batch in a full cache: the pass is one C++ call, with the same kernels
            if not self._native_current():
                self.native, self.native_tensors = self._build_native()
            return self.native.forward(x, cos, sin, cache.keys, cache.values, slot, position, bias.mask)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        q, k, v = self.qkv.decode(self._norm(0, x).view(batch, hidden))
        # [B, H, 1, D] views: with one position, the same memory as [B, 1, H, D] transposed
        q = self.rope(q.view(batch, heads, 1, dim), cos, sin)
        k = self.rope(k.view(batch, kv_heads, 1, dim), cos, sin)
        segments = cache.update(slot, position, k, v.view(batch, kv_heads, 1, dim), rows)
        out = self.attention(q, [s[0] for s in segments], [s[1] for s in segments], bias.mask)
        (attn,) = self.o.decode(out.reshape(batch, heads * dim))  # [B, H, 1, D]: one query, so already [B, H*D] in memory
        x = x + self._norm(1, attn.view(batch, 1, hidden))
        gate, up = self.gate_up.decode(self._norm(2, x).view(batch, hidden))
        (mlp,) = self.down.decode(F.silu(gate) * up)
        return x + self._norm(3, mlp.view(batch, 1, hidden))
