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
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for rows in _row_blocks(n, k):
        w = weight[rows].detach().to(torch.float32, copy=True)  # copy: modified in place below
        s = (w.abs().amax(dim=1) / INT8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
        q[rows] = w.div_(s[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
        scale[rows] = s
    return q, scale


def _row_blocks(n: int, k: int, elements: int = 1 << 20) -> list[slice]:
    """Row blocks of about `elements` weights: the fp32 temporaries stay a few MB, so quantizing
    a large model does not leave the allocator holding a heap of freed full-matrix copies."""
    step = max(1, elements // k)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale.float()[:, None]).to(dtype)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[N, K]` float -> (uint8 q `[N, K]` in 0..15, fp32 scale `[N, K/g]`, fp32 min `[N, K/g]`)."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(n, k // group_size, dtype=torch.float32, device=weight.device)
    low = torch.empty_like(scale)
    for rows in _row_blocks(n, k):
        w = weight[rows].detach().to(torch.float32, copy=True)  # copy: modified in place below
        w = w.reshape(-1, k // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        # A constant group gets the smallest positive scale: q = 0 then reproduces it exactly.
        s = ((hi - lo) / INT4_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
        q[rows] = w.sub_(lo[..., None]).div_(s[..., None]).round_().clamp_(0, INT4_MAX).reshape(-1, k)
        scale[rows], low[rows] = s, lo
    return q, scale, low


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


# looplm's int4 CPU layout (looplm/kernels/csrc/qdot.cpp): columns padded with q = 0 to a
# multiple of 128; every block of 32 columns becomes 16 bytes, byte j = column j | column 16 + j << 4.
LOOPLM_INT4_CHUNK = 128


def pack_int4_looplm(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 `[N, Kp/2]`, fp16 scales `[N, Kp/g]`, fp16 mins `[N, Kp/g]`) for looplm's int4
    kernels, Kp = K rounded up to 128; the padding groups have scale and min 0. fp16 (rounded
    once here, relative error 2^-11) keeps decode's bytes at 4.25 bits per weight at g = 128."""
    n, k = q.shape
    kp = -(-k // LOOPLM_INT4_CHUNK) * LOOPLM_INT4_CHUNK
    if kp % group_size:
        raise ValueError(f"group size {group_size} does not divide the padded width {kp}")
    padded = torch.zeros(n, kp, dtype=torch.uint8, device=q.device)
    padded[:, :k] = q
    halves = padded.view(n, kp // 32, 2, 16)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()
    scales = torch.zeros(n, kp // group_size, dtype=torch.float16, device=q.device)
    mins = torch.zeros_like(scales)
    scales[:, : k // group_size] = scale
    mins[:, : k // group_size] = low
    return packed, scales, mins


def unpack_int4_looplm(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int4_looplm`'s weight: uint8 q `[N, in_features]` in 0..15."""
    n, half = packed.shape
    blocks = packed.view(n, half // 16, 1, 16)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=2).reshape(n, half * 2)[:, :in_features]
