"""Preallocated KV cache with one slot per (UT step, layer).

Ouro runs its layer stack T times per token, and step t's queries attend only to step t's
keys, so the cache has T*L slots indexed `step * num_layers + layer` (the reference layout).
Buffers are allocated once for the whole generation, `[slots, B, H_kv, S_max, D]`, and
written by position: no `torch.cat` per token, and the shapes never change.
All rows of a batch share one length: prompts are left-padded to a common length.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_slots: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens stored so far (same in every slot)

    @property
    def num_slots(self) -> int:
        return self.keys.shape[0]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def update(self, slot: int, start: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value `[B, H_kv, S_new, D]` at positions start.. and return the filled views."""
        end = start + key.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache overflow: writing up to {end} but capacity is {self.max_len}")
        self.keys[slot, :, :, start:end] = key
        self.values[slot, :, :, start:end] = value
        return self.keys[slot, :, :, :end], self.values[slot, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called once per forward pass, after every slot has been written."""
        self.length += num_tokens
