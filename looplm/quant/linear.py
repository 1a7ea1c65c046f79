"""Weight-only quantized replacements for `nn.Linear`: activations stay in the model dtype.

Each module computes `x @ dequant(W).T (+ bias)` and picks its kernel per call:

- `Int8Linear` on CPU: `aten._weight_int8pack_mm` (fused int8 GEMV) for up to `FUSED_MAX_ROWS`
  rows, where it beats bf16 by reading half the bytes; for more rows (prefill) it is 3-4x
  slower than a bf16 GEMM, so the weight is cast to the activation dtype and a plain GEMM
  runs, with the per-channel scale applied to the output (exact: it is per output column).
  With looplm's C++ kernels loaded (`looplm.kernels.use_cpu_kernels`, bf16 CPU models), the
  1-8 row case runs looplm's integer dot-product kernel instead (activations quantized to
  int8 per block of 32 columns on the fly), and on CPUs without AVX-512 BF16 so do prompts of
  up to `INT8_CHUNKED_MAX_ROWS` rows, in calls of 8 rows.
- `Int4Linear` on CPU, torch layout: `aten._weight_int4pack_mm_for_cpu` (fused, group-wise)
  for any number of rows.
- `Int4Linear` on CPU, looplm layout (chosen at load time when looplm's kernels will run the
  model): looplm's integer dot-product kernel for 1-8 rows, and for more rows a C++ dequantize
  to bf16 followed by a GEMM; on CPUs without AVX-512 BF16 the kernel runs every prompt, in
  calls of 8 rows (faster there than dequantizing for an fp32 GEMM).
- `Int4Linear` on CUDA, "cuda" layout (bf16 models on compute capability 8.0+, chosen when the
  module is built on the GPU): torch's fused int4 kernel `aten._weight_int4pack_mm` (tinygemm)
  for any number of rows. Tested by `tests/test_cuda.py` where a GPU exists.
- Anywhere else (int8 on CUDA, int4 shapes or dtypes these kernels reject): dequantize, then
  `F.linear`. Correct, not fast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from looplm.kernels.fp32_gemm import linear_fp32, upcast_weight
from looplm.quant.kernels import (
    cuda_int4_inner_k_tiles,
    dequantize_int4,
    pack_int4_for_cpu,
    pack_int4_for_cuda,
    pack_int4_looplm,
    pack_nibbles,
    unpack_int4_looplm,
    unpack_nibbles,
)

# Up to this many rows the fused int8 kernel beats cast + GEMM (measured crossover: 8-16 rows).
FUSED_MAX_ROWS = 8
# On the upcasting prefill route (CPUs without AVX-512 BF16), prompts run as fused-kernel calls
# of FUSED_MAX_ROWS rows instead of a dequantize + fp32 GEMM: int8 up to this many rows, int4
# always. Measured on the 1.4B shape, AVX2 EPYC (session 12, docs/benchmarks.md): int8 wins up
# to 256 rows and is even at 512; int4 wins at every length, 1.57x at 512. The activations are
# then quantized per block of 32 as in decode (perplexity cost measured in docs/quantization.md).
INT8_CHUNKED_MAX_ROWS = 256


def in_row_chunks(kernel: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """`kernel` over `rows` [M, K] in calls of at most FUSED_MAX_ROWS rows (the kernels compute rows independently)."""
    if rows.shape[0] <= FUSED_MAX_ROWS:
        return kernel(rows.contiguous())
    return torch.cat([kernel(rows[i : i + FUSED_MAX_ROWS].contiguous()) for i in range(0, rows.shape[0], FUSED_MAX_ROWS)])
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts (looplm's too)
INT4_LAYOUTS = ("torch", "looplm", "cuda", "portable")


class Int8Linear(nn.Module):
    """int8 weight `[N, K]`, one scale per output channel (kept in the activation dtype)."""

    # Set by `looplm.kernels.use_cpu_kernels`: looplm's int8 decode kernel, called as
    # kernel(x_rows_bf16, weight_int8, scale_fp32); it streams the weights faster than torch's.
    decode_kernel = None
    # fp32 copy of `scale` (`_scale_fp32`), with the `scale._version` it was made from
    _scale32: tuple[int, torch.Tensor] | None = None
    # Prefill (more than FUSED_MAX_ROWS rows) of a bf16 model: "fp32" on CPUs without AVX-512 BF16,
    # where a bf16 GEMM is several times slower than fp32 (set by `use_cpu_kernels`).
    prefill_route = "bf16"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def _scale_fp32(self) -> torch.Tensor:
        """`scale` in fp32, cached until the buffer changes (looplm's kernel and the fp32 route use it)."""
        if self._scale32 is None or self._scale32[0] != self.scale._version:
            self._scale32 = (self.scale._version, self.scale.float())
        return self._scale32[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = self.scale if self.scale.dtype == x.dtype else self.scale.to(x.dtype)
        fused_rows = INT8_CHUNKED_MAX_ROWS if self.prefill_route == "fp32" else FUSED_MAX_ROWS
        if self.decode_kernel is not None and x.dtype == torch.bfloat16 and x.is_cpu and rows.shape[0] <= fused_rows:
            scale32 = self._scale_fp32()
            y = in_row_chunks(lambda part: self.decode_kernel(part, self.weight_int8, scale32), rows)
        elif x.device.type == "cpu" and rows.shape[0] <= FUSED_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.weight_int8, scale)
        elif self.prefill_route == "fp32" and x.dtype == torch.bfloat16 and x.is_cpu:
            y = (linear_fp32(rows.float(), upcast_weight(self.weight_int8)) * self._scale_fp32()).to(x.dtype)
        else:
            y = F.linear(rows, self.weight_int8.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


def default_int4_layout(
    device: torch.device, out_features: int, group_size: int, dtype: torch.dtype, inner_k_tiles: int | None
) -> str:
    """"torch" on CPU and "cuda" on a capable GPU where their kernels take the shape, else "portable"."""
    if device.type == "cpu" and out_features % 16 == 0 and group_size in INT4_GROUP_SIZES:
        return "torch"
    if (device.type == "cuda" and inner_k_tiles is not None and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 0)):
        return "cuda"
    return "portable"


class Int4Linear(nn.Module):
    """4-bit weight, asymmetric per group of `group_size` input columns.

    `layout` says how the weight is held:
    - "torch": torch's CPU int4 kernel layout with (scale, zero) pairs in the activation dtype
      (needs out_features % 16 == 0);
    - "looplm": looplm's own packed layout with fp16 scales and mins
      (`looplm.quant.kernels.pack_int4_looplm`), run by looplm's C++ kernels once
      `use_cpu_kernels` has set `cpu_kernels`, else dequantized per call;
    - "cuda": torch's CUDA int4 kernel layout (tinygemm) with (scale, zero) pairs in bf16;
    - "portable": nibbles + scale/min in the activation dtype, dequantized per call.
    None picks "torch" on CPU and "cuda" on a GPU where the shape, dtype and device allow, else
    "portable"."""

    # Set by `looplm.kernels.use_cpu_kernels` on "looplm"-layout modules: the extension module.
    cpu_kernels = None
    # "fp32" (CPUs without AVX-512 BF16): prefill runs looplm's int4 kernel in calls of 8 rows,
    # faster there than dequantizing for an fp32 GEMM; "bf16": more than 8 rows dequantize to
    # bf16 for one bf16 GEMM.
    prefill_route = "bf16"

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        low: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        layout: str | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        inner_k_tiles = cuda_int4_inner_k_tiles(self.out_features, self.in_features, group_size)
        if layout is None:
            layout = default_int4_layout(q.device, self.out_features, group_size, dtype, inner_k_tiles)
        if layout not in INT4_LAYOUTS:
            raise ValueError(f"int4 layout must be one of {', '.join(INT4_LAYOUTS)}, got {layout!r}")
        self.layout = layout
        self.fused = layout in ("torch", "cuda")
        if layout == "cuda":
            if inner_k_tiles is None or dtype != torch.bfloat16 or q.device.type != "cuda":
                raise ValueError(f"the cuda int4 layout needs a bf16 [N % 8, K] weight on a GPU, got "
                                 f"{tuple(q.shape)} {dtype} on {q.device} with group size {group_size}")
            packed, scales_and_zeros = pack_int4_for_cuda(q, scale, low, dtype, inner_k_tiles)
            self.register_buffer("weight_packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        elif layout == "torch":
            packed, scales_and_zeros = pack_int4_for_cpu(q, scale, low, dtype)
            self.register_buffer("weight_packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        elif layout == "looplm":
            packed, scales, mins = pack_int4_looplm(q, scale, low, group_size)
            self.register_buffer("weight_looplm", packed)
            self.register_buffer("scales_looplm", scales)
            self.register_buffer("mins_looplm", mins)
        else:
            self.register_buffer("weight_nibbles", pack_nibbles(q))
            self.register_buffer("scale", scale.to(dtype).contiguous())
            self.register_buffer("low", low.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the kernel multiplies by (for tests and fallbacks): in the activation dtype,
        fp32 for the "looplm" layout (from its fp16 scales and mins)."""
        if self.layout in ("torch", "cuda"):
            sz = self.scales_and_zeros
            eye = torch.eye(self.in_features, dtype=sz.dtype, device=sz.device)
            return self._fused(eye).T.contiguous()
        if self.layout == "looplm":
            shape = (self.out_features, self.in_features)
            q, scale, low = unpack_int4_looplm(self.weight_looplm, self.scales_looplm, self.mins_looplm, shape,
                                               self.group_size)
            return dequantize_int4(q, scale, low, self.group_size, torch.float32)
        q = unpack_nibbles(self.weight_nibbles)
        return dequantize_int4(q, self.scale, self.low, self.group_size, self.scale.dtype)

    def _fused(self, rows: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        if self.layout == "cuda":  # the kernel takes bf16 activations only
            out = torch.ops.aten._weight_int4pack_mm(rows.to(sz.dtype).contiguous(), self.weight_packed,
                                                     self.group_size, sz)
            return out.to(rows.dtype)
        sz = sz if sz.dtype == rows.dtype else sz.to(rows.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), self.weight_packed, self.group_size, sz)

    def _looplm(self, rows: torch.Tensor) -> torch.Tensor:
        kernels = self.cpu_kernels
        args = (self.weight_looplm, self.scales_looplm, self.mins_looplm, self.group_size)
        if rows.shape[0] <= FUSED_MAX_ROWS or self.prefill_route == "fp32":
            return in_row_chunks(lambda part: kernels.int4_dot_linear(part, *args, self.out_features), rows)
        return F.linear(rows, kernels.int4_dequantize(*args, self.in_features, self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.layout in ("torch", "cuda"):
            if x.device != self.weight_packed.device:
                raise RuntimeError(f"this Int4Linear was packed for {self.weight_packed.device.type}, the input is on "
                                   f"{x.device.type}; quantize the model on its target device")
            y = self._fused(rows)
        elif self.cpu_kernels is not None and x.dtype == torch.bfloat16 and x.is_cpu:
            y = self._looplm(rows)
        else:
            y = F.linear(rows, self.dequantized_weight().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, layout={self.layout}")
