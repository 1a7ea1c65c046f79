"""Weight-only quantized replacements for `nn.Linear`: activations stay in the model dtype.

Each module computes `x @ dequant(W).T (+ bias)` and picks its kernel per call:

- `Int8Linear` on CPU: `aten._weight_int8pack_mm` (fused int8 GEMV) for up to `FUSED_MAX_ROWS`
  rows, where it beats bf16 by reading half the bytes; for more rows (prefill) it is 3-4x
  slower than a bf16 GEMM, so the weight is cast to the activation dtype and a plain GEMM
  runs, with the per-channel scale applied to the output (exact: it is per output column).
- `Int4Linear` on CPU: `aten._weight_int4pack_mm_for_cpu` (fused, group-wise) for any number
  of rows: dequantizing a group-wise int4 weight in eager PyTorch costs as much as the kernel
  loses at M=512 (benchmarks/bench_quant_kernels.py), so there is no second route.
- Anywhere else (cuda, or int4 shapes the CPU kernel rejects): dequantize, then `F.linear`.
  Correct, not fast; the cuda path is not exercised by the tests (they run on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from looplm.quant.kernels import (
    dequantize_int4,
    pack_int4_for_cpu,
    pack_nibbles,
    unpack_nibbles,
)

# Up to this many rows the fused int8 kernel beats cast + GEMM (measured crossover: 8-16 rows).
FUSED_MAX_ROWS = 8
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts


class Int8Linear(nn.Module):
    """int8 weight `[N, K]`, one scale per output channel (kept in the activation dtype)."""

    # Set by `looplm.kernels.use_cpu_kernels`: looplm's int8 decode kernel, called as
    # kernel(x_rows_bf16, weight_int8, scale_fp32); it streams the weights faster than torch's.
    decode_kernel = None

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
        if self.decode_kernel is not None and x.dtype == torch.bfloat16 and x.is_cpu and rows.shape[0] <= FUSED_MAX_ROWS:
            y = self.decode_kernel(rows, self.weight_int8, self.scale.float())
        elif x.device.type == "cpu" and rows.shape[0] <= FUSED_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight_int8, scale)
        else:
            y = F.linear(rows, self.weight_int8.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class Int4Linear(nn.Module):
    """4-bit weight, asymmetric per group of `group_size` input columns.

    On CPU (out_features a multiple of 16) the weight is held in the CPU kernel's packed
    layout with (scale, zero) pairs; elsewhere as portable nibbles + scale/min, dequantized
    per call."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        low: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.fused = q.device.type == "cpu" and self.out_features % 16 == 0 and group_size in INT4_GROUP_SIZES
        if self.fused:
            packed, scales_and_zeros = pack_int4_for_cpu(q, scale, low, dtype)
            self.register_buffer("weight_packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        else:
            self.register_buffer("weight_nibbles", pack_nibbles(q))
            self.register_buffer("scale", scale.to(dtype).contiguous())
            self.register_buffer("low", low.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the kernel multiplies by, in the activation dtype (for tests and fallbacks)."""
        if self.fused:
            eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
            return self._fused(eye).T.contiguous()
        q = unpack_nibbles(self.weight_nibbles)
        return dequantize_int4(q, self.scale, self.low, self.group_size, self.scale.dtype)

    def _fused(self, rows: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        sz = sz if sz.dtype == rows.dtype else sz.to(rows.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.weight_packed, self.group_size, sz)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.fused:
            if x.device.type != "cpu":
                raise RuntimeError("this Int4Linear was packed for CPU; quantize the model on its target device")
            y = self._fused(rows)
        else:
            y = F.linear(rows, self.dequantized_weight().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, fused={self.fused}")
