"""looplm's CPU inference kernels for bf16 models, and the loader's policy for using them.

Linear layers: a streaming kernel for decode, a per-CPU route for prefill.

Decode multiplies 1-8 activation rows by each weight matrix, so it is bound by how fast
weights stream from memory; the C++ kernel (`csrc/gemv.cpp`) reads them near the machine's
bandwidth, where torch's bf16 `F.linear` at M=1 reaches a fraction of it.

Prefill is a real GEMM. CPUs with AVX-512 BF16 run bf16 GEMM fast through oneDNN; AVX2-only
CPUs run it several times slower than fp32 GEMM, so there each weight is upcast to fp32 for
the pass, one at a time, into a reused buffer, for oneDNN's fp32 GEMM (`fp32_gemm`).

Norms and rotary embeddings: fused C++ ops (`csrc/fused.cpp`) with the eager modules' exact
rounding, one call each instead of about ten tensor ops, for decode's per-op overhead.

Attention: decode's single query per sequence goes to a C++ kernel that streams the cached
K/V (all segments of the shared-KV cache, grouped-query heads unexpanded) in fp32.

Projections that share an input (q/k/v, gate/up) decode as one group (`shared_input`): their
kernels called directly, without the modules' per-call overhead.

Quantized layers (`looplm.quant`): `Int8Linear` and `Int4Linear` (in looplm's int4 layout,
which the loader picks when these kernels will run the model) get integer dot-product
decode kernels (`csrc/qdot.cpp`: activations quantized to int8 per block of 32 on the fly);
int4 prefill dequantizes in C++ and runs a GEMM on the same route as the bf16 layers.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from looplm.errors import ConfigError
from looplm.kernels.decode_layer import LayerDecodePlan
from looplm.kernels.extension import extension_or_reason
from looplm.kernels.fp32_gemm import upcast_linear
from looplm.kernels.shared_input import SharedInputGroup
from looplm.kernels.swap import replace_linears
from looplm.models.ouro import MLP, Attention, DecoderLayer, RMSNorm
from looplm.quant.linear import Int4Linear, Int8Linear

MAX_SKINNY_ROWS = 8
# Where prefill would upcast each weight to fp32 (CPUs without AVX-512 BF16), a short prompt is
# cheaper as skinny-kernel calls of 8 rows: on an AVX2 EPYC (2 threads) 1.4-2.0x faster for
# 9-16 rows on the 1.4B shape's matrices, even at 24, slower from 32 (session 12).
MAX_CHUNKED_SKINNY_ROWS = 16
PrefillRoute = Literal["bf16", "fp32"]


class SkinnyLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) whose bf16 CPU inference forward
    uses looplm's kernels. Anything else (training, other dtypes, other devices) takes
    `F.linear` unchanged."""

    prefill_route: PrefillRoute = "bf16"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            weight.dtype != torch.bfloat16
            or x.dtype != torch.bfloat16
            or not x.is_cpu
            or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        ):
            return F.linear(x, weight, self.bias)
        rows = x.numel() // x.shape[-1]
        if rows <= MAX_SKINNY_ROWS or (self.prefill_route == "fp32" and rows <= MAX_CHUNKED_SKINNY_ROWS):
            kernels, _ = extension_or_reason()
            flat = x.reshape(rows, x.shape[-1])
            parts = [kernels.skinny_linear_bf16(flat[i : i + MAX_SKINNY_ROWS].contiguous(), weight)
                     for i in range(0, rows, MAX_SKINNY_ROWS)]  # rows are independent: chunks concatenate
            out = (parts[0] if len(parts) == 1 else torch.cat(parts)).view(*x.shape[:-1], weight.shape[0])
        elif self.prefill_route == "fp32":
            out = upcast_linear(x, weight)
        else:
            out = F.linear(x, weight)
        return out if self.bias is None else out + self.bias


def choose_prefill_route(cpu_path: str) -> PrefillRoute:
    """bf16 GEMM where the CPU has bf16 dot products; fp32 upcast where it does not."""
    return "bf16" if cpu_path == "avx512bf16" else "fp32"


def use_cpu_kernels(model: nn.Module) -> dict:
    """Swap every bf16 `nn.Linear` of a CPU model (except the exit gate) for `SkinnyLinear`
    (in place, parameters shared, tied weights stay tied) and give every attention module the
    single-query decode kernel (and int8 layers the int8 kernel). Returns what was done; the
    loader keeps it as `model.kernels` and the bench reports it.

    Raises RuntimeError (saying why) when the kernels cannot load; callers choose whether
    that is fatal."""
    kernels, path_or_reason = extension_or_reason()
    if kernels is None:
        raise RuntimeError(path_or_reason)
    route = choose_prefill_route(path_or_reason)

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        # The exit gate stays on torch's op: it costs nothing, and a last-bit change in a
        # gate value can flip a threshold exit decision against the reference.
        skip = name.endswith("early_exit_gate") or isinstance(linear, SkinnyLinear)
        if skip or linear.weight.dtype != torch.bfloat16 or not linear.weight.is_cpu:
            return None
        new = SkinnyLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        new.prefill_route = route
        return new

    replaced = replace_linears(model, make, include_tied=True)
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    for module in attention:
        module.decode_kernel = kernels.decode_attention_bf16
        module.rope_kernel = kernels.rope_bf16
    # Norms and RoPE: fused, bit-identical to the eager ops (tests/test_kernels.py); at decode a
    # layer pass is otherwise ~40 small tensor ops whose dispatch cost rivals a narrow model's GEMVs.
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    for module in norms:
        module.kernel = kernels.rms_norm_bf16
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    for module in int8:
        module.decode_kernel = kernels.int8_dot_linear
        module.prefill_route = route
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear) and m.layout == "looplm"]
    for module in int4:
        module.cpu_kernels = kernels
        module.prefill_route = route
    groups = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.qkv_group = SharedInputGroup.build(module, ("q_proj", "k_proj", "v_proj"), kernels)
            groups += module.qkv_group is not None
        elif isinstance(module, MLP):
            module.gate_up_group = SharedInputGroup.build(module, ("gate_proj", "up_proj"), kernels)
            groups += module.gate_up_group is not None
    plans = 0
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            module.decode_plan = LayerDecodePlan.build(module, kernels)
            plans += module.decode_plan is not None
    return {"kernel": path_or_reason, "prefill": route, "linears": len(replaced), "attention": len(attention),
            "norms": len(norms), "int8_linears": len(int8), "int4_linears": len(int4), "shared_input_groups": groups,
            "decode_plans": plans}


KERNEL_MODES = ("auto", "torch")


def kernel_mode(mode: str) -> str:
    """The requested mode after the `LOOPLM_KERNELS` override, checked."""
    mode = os.environ.get("LOOPLM_KERNELS", mode)
    if mode not in KERNEL_MODES:
        raise ConfigError(f"kernels '{mode}' is not supported (choose {', '.join(KERNEL_MODES)})")
    return mode


def int4_layout(mode: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The in-memory int4 layout for a model about to be loaded: looplm's own when
    `apply_kernels` will put looplm's kernels on it, else None (torch's, see `Int4Linear`)."""
    if kernel_mode(mode) == "torch" or torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return None
    return "looplm" if extension_or_reason()[0] is not None else None


def apply_kernels(model: nn.Module, mode: str = "auto") -> dict | None:
    """The loader's policy: "auto" uses looplm's CPU kernels for a bf16 model on CPU and warns
    (once per process, never silently) when they cannot load; "torch" keeps plain torch ops.
    `LOOPLM_KERNELS=torch` in the environment forces "torch"."""
    mode = kernel_mode(mode)
    first = next(model.parameters(), None)
    if mode == "torch" or first is None or first.device.type != "cpu" or first.dtype != torch.bfloat16:
        return None
    try:
        return use_cpu_kernels(model)
    except RuntimeError as error:
        warnings.warn(f"looplm: {error}; using torch's bf16 linear layers (slower decode)", stacklevel=3)
        return None
