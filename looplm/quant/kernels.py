"""Quantize, dequantize and pack weights: pure tensor functions, no modules.

int8: symmetric per output channel, `w ≈ q * scale[n]`, q in [-127, 127].
int4: asymmetric per group of `group_size` input columns, `w ≈ q * scale[n, g] + min[n, g]`,
q in [0, 15]. That (q, scale, min) triple is the portable form stored on disk; the CPU
kernel's own packed layout is made from it at load time (`pack_int4_for_cpu`).
"""

from __future__ import annotations

import torch

INT4_MAX = 15
INT8_MAX = 127
# torch's int4 kernels dequantize as (q - 8) * scale + zero, so zero = min + 8 * scale.
TINYGEMM_MID = 8


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, K]` float -> (int8 `[N, K]`, fp32 scale `[N]`). Rounds in fp32."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale.float()[:, None]).to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[N, K]` float -> (uint8 q `[N, K]` in 0..15, fp32 scale `[N, K/g]`, fp32 min `[N, K/g]`)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    # A constant group gets the smallest positive scale: q = 0 then reproduces it exactly.
    scale = ((high - low) / INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, INT4_MAX).to(torch.uint8)
    return q.reshape(n, k), scale, low


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    n, k = q.shape
    w = q.reshape(n, k // group_size, group_size).float() * scale.float()[..., None] + low.float()[..., None]
    return w.reshape(n, k).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, K]` in 0..15 -> uint8 `[N, K/2]`; column 2j in the low nibble, 2j+1 in the high."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`."""
    n, half = packed.shape
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(n, half * 2)


def tinygemm_scales_and_zeros(scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[K/g, N, 2]` (scale, zero) in the activation dtype, as torch's int4 kernels want it."""
    zero = low.float() + TINYGEMM_MID * scale.float()
    return torch.stack((scale.float(), zero), dim=-1).transpose(0, 1).contiguous().to(dtype)


def pack_int4_for_cpu(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CPU-kernel packed weight, scales_and_zeros) for `aten._weight_int4pack_mm_for_cpu`."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 8)  # inner_k_tiles unused on CPU
    return packed, tinygemm_scales_and_zeros(scale, low, dtype)
