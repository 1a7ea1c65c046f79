"""K/V of finished sequences, kept for later prompts that start the same way.

Chat clients send the whole conversation with every message, so a turn's prompt begins with the
previous turn's prompt and reply. On a CPU the prompt pass is the slow part of a turn; the engine
stores each finished sequence's K/V here (prompt and reply, by token ids) and starts a new prompt
from the longest stored prefix it shares, prefilling only the rest.

Only K/V that a prompt pass would also compute are stored and reused: every loop run, one K/V
per (step, layer) (so not `kv_mode="shared"` nor `skip_compute`), for the same loop count. The
store holds at most `budget_bytes`; the entry used least recently goes first. A sequence larger
than the whole budget keeps its leading tokens, as many as fit: the start (a system prompt,
few-shot examples, the earlier turns) is what later prompts share.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from looplm.prompt_cache import reusable_prefix


@dataclass
class StoredPrefix:
    ids: tuple[int, ...]
    keys: torch.Tensor  # [T*L, H_kv, n, D]
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class PrefixStore:
    def __init__(self, budget_bytes: int, min_tokens: int = 16) -> None:
        self.budget_bytes, self.min_tokens = budget_bytes, min_tokens
        self._entries: OrderedDict[tuple[int, tuple[int, ...]], StoredPrefix] = OrderedDict()  # (steps, ids)
        self.nbytes = 0

    def put(self, steps: int, ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep `ids`' K/V `[T*L, H_kv, n, D]` (copied), or as many leading tokens as the budget
        holds; entries it extends are dropped."""
        per_token = (keys.nbytes + values.nbytes) // max(1, len(ids))
        fits = min(len(ids), self.budget_bytes // max(1, per_token))
        if fits < self.min_tokens:
            return
        entry = StoredPrefix(tuple(ids[:fits]), keys[:, :, :fits].clone(), values[:, :, :fits].clone())
        for key in [k for k in self._entries if k[0] == steps and entry.ids[: len(k[1])] == k[1]]:
            self._drop(key)
        self._entries[(steps, entry.ids)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def longest(self, steps: int, prompt: list[int]) -> tuple[int, StoredPrefix | None]:
        """The stored entry sharing the longest prefix with `prompt`, and that length: at most all
        but the last prompt token (its logits pick the first new token), at least `min_tokens`."""
        best, found = 0, None
        for entry_steps, ids in self._entries:
            if entry_steps != steps:
                continue
            shared = reusable_prefix(ids, prompt)
            if shared > best:
                best, found = shared, (entry_steps, ids)
        if best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(found)
        return best, self._entries[found]

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: tuple[int, tuple[int, ...]]) -> None:
        self.nbytes -= self._entries.pop(key).nbytes
