"""Preallocated KV caches for looped models.

Ouro runs its layer stack T times per token, and step t's queries attend only to step t's
keys, so the reference cache has T*L slots indexed `step * num_layers + layer`. Buffers are
allocated once for the whole generation and written by position: no `torch.cat` per token,
and the shapes never change. All rows of a batch share one length (prompts are left-padded).

Two modes:
- `KVCache` (`kv_mode="full"`): the reference layout, `[T*L, B, H_kv, S_max, D]`.
- `SharedKVCache` (`kv_mode="shared"`): the paper's last-step sharing. Prompt positions keep
  their per-step entries; each decoded position stores ONE K/V per layer, which every step
  reads. Each step of a decoded token overwrites that entry, so what stays is the K/V of the
  last step the token computed. KV growth per decoded token drops by the step count.

`update` returns the keys/values a query must attend to, as a list of `(K, V)` segments in
position order (one segment for the full cache, two for the shared one).
`rows` restricts reads and writes to a subset of the batch (rows that exited early stop).

Buffers start zeroed unless the caller says its readers never look past the positions written
(`zeroed=False`, what `generate` asks for): then they come from `torch.empty`, and only the pages
the generation reaches are ever touched. Zeroing a cache sized for 4096 new tokens of the 1.4B
shape (3.2 GB) took the first token from 1.0 s to 5.4 s and the peak RSS from 2.9 to 5.9 GiB,
however few tokens the reply turned out to have.
"""

from __future__ import annotations

import torch

Segments = list[tuple[torch.Tensor, torch.Tensor]]


def kv_bytes_per_token(
    num_steps: int, num_layers: int, num_kv_heads: int, head_dim: int, element_size: int, kv_mode: str = "full"
) -> int:
    """Cache bytes one decoded token adds: K and V for each (step, layer) slot, or per layer if shared."""
    slots = num_steps * num_layers if kv_mode == "full" else num_layers
    return 2 * slots * num_kv_heads * head_dim * element_size


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, zeroed: bool) -> torch.Tensor:
    """A cache buffer: zeros, or memory as the allocator gives it (contents undefined)."""
    if zeroed:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _write(buffer: torch.Tensor, rows: torch.Tensor | None, begin: int, end: int, tensor: torch.Tensor) -> None:
    """Write `tensor` `[B or N, H_kv, S, D]` into positions begin:end of a `[B, H_kv, S_max, D]` buffer."""
    if rows is None:
        buffer[:, :, begin:end] = tensor
    else:
        buffer[rows, :, begin:end] = tensor


def _read(buffer: torch.Tensor, rows: torch.Tensor | None, end: int | None = None) -> torch.Tensor:
    """Positions :end of all rows (a view) or of `rows` (a gathered copy)."""
    selected = buffer if rows is None else buffer[rows]
    return selected if end is None else selected[:, :, :end]


class KVCache:
    mode = "full"

    def __init__(
        self,
        num_steps: int,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        zeroed: bool = True,
    ) -> None:
        self.num_steps, self.num_layers = num_steps, num_layers
        shape = (num_steps * num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = allocate(shape, dtype, device, zeroed)
        self.values = allocate(shape, dtype, device, zeroed)
        self.max_len = max_len
        self.length = 0  # tokens stored so far (same in every slot)

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, num_steps: int, length: int) -> KVCache:
        """A full-mode cache over existing buffers `[T*L, B, H_kv, S_max, D]`, e.g. the first B rows
        of a bigger batch buffer (the server's continuous batching). Nothing is allocated or copied."""
        assert keys.shape == values.shape and keys.shape[0] % num_steps == 0, (keys.shape, values.shape, num_steps)
        cache = cls.__new__(cls)
        cache.num_steps, cache.num_layers = num_steps, keys.shape[0] // num_steps
        cache.keys, cache.values = keys, values
        cache.max_len, cache.length = keys.shape[3], length
        return cache

    @property
    def num_slots(self) -> int:
        return self.keys.shape[0]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def bytes_per_decoded_token(self) -> int:
        """Cache bytes one more decoded token occupies, over the whole batch."""
        per_slot = self.keys[:, :, :, 0].numel() // self.num_slots * self.keys.element_size()
        return 2 * self.num_slots * per_slot

    def _check(self, end: int) -> None:
        if end > self.max_len:
            raise IndexError(f"KV cache overflow: writing up to {end} but capacity is {self.max_len}")

    def update(
        self, slot: int, start: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None = None
    ) -> Segments:
        """Write key/value `[B, H_kv, S_new, D]` at positions start.. and return what to attend to."""
        end = start + key.shape[2]
        self._check(end)
        _write(self.keys[slot], rows, start, end, key)
        _write(self.values[slot], rows, start, end, value)
        return [(_read(self.keys[slot], rows, end), _read(self.values[slot], rows, end))]

    def fill_skipped(self, rows: torch.Tensor, exit_step: int, position: int) -> None:
        """Rows that exited after `exit_step` never computed the deeper steps at `position`:
        copy their exit step's K/V there, so later tokens attend to something sensible."""
        if exit_step + 1 >= self.num_steps:
            return
        shape = (self.num_steps, self.num_layers, *self.keys.shape[1:])
        for buffer in (self.keys.view(shape), self.values.view(shape)):
            buffer[exit_step + 1 :, :, rows, :, position] = buffer[exit_step, :, rows, :, position]

    def advance(self, num_tokens: int) -> None:
        """Called once per forward pass, after every slot has been written."""
        self.length += num_tokens


class SharedKVCache(KVCache):
    mode = "shared"

    def __init__(
        self,
        num_steps: int,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        prompt_len: int,
        max_new: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        zeroed: bool = True,
    ) -> None:
        super().__init__(num_steps, num_layers, batch_size, num_kv_heads, prompt_len, head_dim, dtype, device, zeroed)
        self.prompt_len = prompt_len
        shared = (num_layers, batch_size, num_kv_heads, max_new, head_dim)
        self.shared_keys = allocate(shared, dtype, device, zeroed)
        self.shared_values = allocate(shared, dtype, device, zeroed)
        self.max_len = prompt_len + max_new

    def nbytes(self) -> int:
        return super().nbytes() + self.shared_keys.nbytes + self.shared_values.nbytes

    def bytes_per_decoded_token(self) -> int:
        per_layer = self.shared_keys[:, :, :, 0].numel() // self.num_layers * self.shared_keys.element_size()
        return 2 * self.num_layers * per_layer

    def update(
        self, slot: int, start: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None = None
    ) -> Segments:
        end = start + key.shape[2]
        self._check(end)
        if end <= self.prompt_len:  # prefill: per-step entries, as in the full cache
            return super().update(slot, start, key, value, rows)
        if start < self.prompt_len:
            raise ValueError("a shared-KV forward pass must not straddle the end of the prompt")
        layer = slot % self.num_layers
        begin, stop = start - self.prompt_len, end - self.prompt_len
        _write(self.shared_keys[layer], rows, begin, stop, key)
        _write(self.shared_values[layer], rows, begin, stop, value)
        prompt = (_read(self.keys[slot], rows), _read(self.values[slot], rows))
        decoded = (_read(self.shared_keys[layer], rows, stop), _read(self.shared_values[layer], rows, stop))
        return [prompt, decoded]

    def fill_skipped(self, rows: torch.Tensor, exit_step: int, position: int) -> None:
        """Nothing to fill: the shared entry already holds the last computed step's K/V."""
