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


# torch's CUDA int4 kernel (tinygemm, `aten._weight_int4pack_mm`) tiles K by 16 x inner_k_tiles
# and N by 8; it takes bf16 activations and needs compute capability 8.0 or newer.
CUDA_INT4_INNER_K_TILES = (8, 4, 2)


def cuda_int4_inner_k_tiles(n: int, k: int, group_size: int) -> int | None:
    """The largest inner_k_tiles the CUDA kernel accepts for an `[n, k]` weight, or None."""
    if n % 8 or group_size not in (32, 64, 128, 256) or k % group_size:
        return None
    return next((tiles for tiles in CUDA_INT4_INNER_K_TILES if k % (16 * tiles) == 0), None)


def pack_int4_for_cuda(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype, inner_k_tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CUDA-kernel packed weight, scales_and_zeros) for `aten._weight_int4pack_mm`; `q` on the GPU.

    The CUDA packer takes uint8 `[N, K/2]` with column 2j in the HIGH nibble (the reverse of
    `pack_nibbles`), as torch's own int4 tests build it."""
    pairs = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
    return packed, tinygemm_scales_and_zeros(scale, low, dtype)


# looplm's int4 CPU layout (looplm/kernels/csrc/qdot.cpp explains it): output rows in tiles of
# 16, columns padded with q = 0 to a multiple of 128; per tile and 8 columns, 64 bytes: 4 per
# row, byte i = column i | column 4 + i << 4. Scales and mins per tile: [groups, 16 rows].
LOOPLM_INT4_CHUNK = 128
LOOPLM_INT4_TILE = 16


def pack_int4_looplm(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 `[T, Kp*8]`, fp16 scales `[T, Kp/g*16]`, fp16 mins `[T, Kp/g*16]`) for looplm's
    int4 kernels: T = ceil(N/16) tiles, Kp = K rounded up to 128; padding rows and columns have
    q, scale and min 0. fp16 (rounded once here, relative error 2^-11) keeps decode's bytes at
    4.25 bits per weight at g = 128."""
    n, k = q.shape
    kp = -(-k // LOOPLM_INT4_CHUNK) * LOOPLM_INT4_CHUNK
    if kp % group_size:
        raise ValueError(f"group size {group_size} does not divide the padded width {kp}")
    tiles = -(-n // LOOPLM_INT4_TILE)
    padded = torch.zeros(tiles * LOOPLM_INT4_TILE, kp, dtype=torch.uint8, device=q.device)
    padded[:n, :k] = q
    v = padded.view(tiles, LOOPLM_INT4_TILE, kp // 8, 2, 4)  # tile, row, octet, nibble, byte
    packed = (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).permute(0, 2, 1, 3).reshape(tiles, kp * 8).contiguous()

    def tiled(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(tiles * LOOPLM_INT4_TILE, kp // group_size, dtype=torch.float16, device=q.device)
        out[:n, : k // group_size] = values
        return out.view(tiles, LOOPLM_INT4_TILE, -1).transpose(1, 2).reshape(tiles, -1).contiguous()

    return packed, tiled(scale), tiled(low)


def unpack_int4_looplm(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, shape: tuple[int, int], group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_int4_looplm` for an `[N, K]` weight: (uint8 q `[N, K]` in 0..15,
    fp16 scale `[N, K/g]`, fp16 min `[N, K/g]`)."""
    n, k = shape
    tiles, width = packed.shape
    v = packed.view(tiles, width // 64, LOOPLM_INT4_TILE, 4).permute(0, 2, 1, 3)  # tile, row, octet, byte
    q = torch.stack((v & 0x0F, v >> 4), dim=3).reshape(tiles * LOOPLM_INT4_TILE, width // 8)

    def untiled(values: torch.Tensor) -> torch.Tensor:
        rows = values.view(tiles, -1, LOOPLM_INT4_TILE).transpose(1, 2).reshape(tiles * LOOPLM_INT4_TILE, -1)
        return rows[:n, : k // group_size]

    return q[:n, :k], untiled(scales), untiled(mins)
