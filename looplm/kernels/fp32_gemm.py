"""The fp32 prefill GEMM, for CPUs without fast bf16 matrix math (AVX2-only parts).

There torch's bf16 GEMM runs at a fraction of its fp32 speed, so prefill upcasts each layer's
weight to fp32 for the pass (`looplm.kernels.cpu`). Two details decide how fast that is;
measured with oneDNN and ATen limited to AVX2 on a 2-core Zen 4 VM, M = 512, Ouro-1.4B
layer shapes, 2 threads (benchmarks/bench_prefill_gemm.py):

- the upcast writes into a buffer kept between calls: a fresh 46 MB fp32 tensor per call
  pays page faults on first touch, which made the 2048x5632 and 5632x2048 GEMMs 15-25%
  slower (no difference at 2048x2048);
- oneDNN's fp32 matmul (`torch.ops.mkldnn._linear_pointwise`, the op torch's own compiler
  emits for CPU linears) ran 135-165 GFLOP/s where `F.linear` (MKL's sgemm) ran 100-125, and
  torch's bf16 GEMM 30-40.

The buffer is per thread (a server may run models from several threads) and holds at most
`MAX_KEPT_ELEMENTS`; a larger weight (a big lm_head) gets a one-off tensor instead.
"""

from __future__ import annotations

import math
import threading
from functools import cache

import torch
import torch.nn.functional as F

MAX_KEPT_ELEMENTS = 64 * 2**20  # 256 MiB of fp32: every Ouro layer weight fits, the lm_head does not

_local = threading.local()


@cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's fp32 linear op (CPU wheels do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def fp32_weight_buffer(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """An uninitialised fp32 tensor of `shape`, reusing this thread's buffer when it fits.
    Only valid until the next call on the same thread."""
    numel = math.prod(shape)
    if numel > MAX_KEPT_ELEMENTS:
        return torch.empty(shape)
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        # A normal tensor even when first made under inference_mode: an inference tensor
        # could not be written to by a later call outside it (no_grad evaluation, say).
        with torch.inference_mode(False):
            buffer = torch.empty(numel)
        _local.buffer = buffer
    return buffer[:numel].view(shape)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 `x @ weight.T` (no bias) on the fastest fp32 GEMM this torch has."""
    if onednn_linear_available():
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def upcast_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (bf16, int8, ...) converted to fp32 in this thread's buffer (see above)."""
    weight32 = fp32_weight_buffer(weight.shape)
    weight32.copy_(weight)
    return weight32


def upcast_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for bf16 `x` and `weight`, computed in fp32, rounded back to x's dtype."""
    return linear_fp32(x.float(), upcast_weight(weight)).to(x.dtype)
