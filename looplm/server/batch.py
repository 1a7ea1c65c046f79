"""One running batch of the server: rows that share a loop configuration and one KV buffer.

Continuous batching with left padding. The batch buffer is `[T*L, B_cap, H_kv, S_cap, D]`
with one write cursor `length` for all rows. A row's tokens are contiguous: columns
`[start, length)` of its buffer row, and the key-validity mask `valid` hides everything before
`start`. RoPE positions are per row (`next_position`), so a row sees exactly what it would see
alone, only left-padded.

- prefill: short prompts admitted together (same loop configuration) run as one left-padded
  batch (`prefill_prompts`), so a round of them reads the weights once, not once each; a long
  prompt runs a chunk at a time (`ChunkedPrefill`) between the batches' decode steps.
- join: a prefilled row's n prompt columns are copied to `[length - n, length)` of a free
  buffer row. If n > length the whole batch first moves right by n - length (more left padding
  for the others).
- decode: one token for every row through `model.decode_step`, with the validity mask.
- leave: the last buffer row moves into the hole (one row copied), and once the leading
  columns are padding for every row the batch moves left (compaction).

`kv_mode="shared"` is served with the shared mode's semantics on this full layout: after each
decode step, the K/V of the last step a token computed is copied into every step's slot at
that position, so every step of a later token reads that one entry, as `SharedKVCache` does.
It does not save the memory that `SharedKVCache` saves (that cache has one prompt boundary for
the whole batch, which rows joining at different times do not have).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from looplm.cache import KVCache
from looplm.exit import ExitPolicy, make_policy
from looplm.models.ouro import OuroForCausalLM, StepOutput, positions_from_mask


@dataclass(frozen=True)
class LoopConfig:
    """What decides which batch a request joins: `decode_step` takes one of each per call."""

    steps: int
    exit_policy: str | None
    exit_threshold: float | None
    kv_mode: str
    skip_compute: bool


@dataclass
class Prefill:
    """Prompts run together: row i holds prompt i's n_i tokens at cache columns
    `[width - n_i, width)` (left padding), its last-position logits `[V]` and 0-based exit step."""

    cache: KVCache
    lengths: list[int]
    logits: torch.Tensor  # [k, V]
    exit_steps: torch.Tensor  # [k]
    every: torch.Tensor | None = None  # one prompt's logits at every position [n, V], when asked


def prefill_prompts(model: OuroForCausalLM, steps: int, policy: ExitPolicy, prompts: list[list[int]],
                    every_position: bool = False) -> Prefill:
    """Run `prompts` through every loop as one left-padded batch (one prompt: no padding, no
    mask). `every_position` (one prompt only) also reads the logits at each prompt position."""
    if every_position and len(prompts) != 1:
        raise ValueError("every_position reads one prompt at a time")
    width, device = max(map(len, prompts)), model.device
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)  # padding ids are masked out
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
        mask[i, width - len(prompt):] = 1
    attention_mask = None if bool(mask.all()) else mask
    cache = model.make_cache(len(prompts), width, steps)
    out = model.run_steps(ids, positions_from_mask(attention_mask, ids), attention_mask, cache, steps)
    logits, exit_steps = model.readout(out, policy, position=-1)
    every = _every_position(model, out, policy) if every_position else None
    return Prefill(cache, [len(p) for p in prompts], logits, exit_steps, every)


def _every_position(model: OuroForCausalLM, out: StepOutput, policy: ExitPolicy) -> torch.Tensor:
    """The logits each position of row 0 reads under `policy` `[n, V]` (per position, so the
    readouts of a prompt's chunks concatenate)."""
    row = StepOutput(out.hidden_states[:, 0], out.gate_lambda[:, 0], out.exit_probs[:, 0])
    return model.readout_tokens(row, policy)[0]


class ChunkedPrefill:
    """One prompt prefilled a chunk at a time (batch 1, every loop, no padding), so that running
    batches keep decoding between its chunks instead of waiting for the whole prompt."""

    def __init__(self, model: OuroForCausalLM, steps: int, policy: ExitPolicy, prompt: list[int],
                 every_position: bool = False, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`prefix`: the K/V `[T*L, H_kv, k, D]` of the prompt's first k tokens, from an earlier
        request (`PrefixStore`); only the rest is run."""
        self.model, self.steps, self.policy, self.prompt = model, steps, policy, prompt
        self.every_position = every_position
        self.cache = model.make_cache(1, len(prompt), steps)
        self.kept = 0
        if prefix is not None:
            self.kept = prefix[0].shape[2]
            self.cache.keys[:, 0, :, : self.kept] = prefix[0]
            self.cache.values[:, 0, :, : self.kept] = prefix[1]
            self.cache.length = self.kept
        self._every: list[torch.Tensor] = []

    @property
    def done(self) -> int:
        """Prompt tokens already in the cache."""
        return self.cache.length

    def advance(self, tokens: int) -> Prefill | None:
        """Run the next `tokens` prompt tokens; after the last chunk, the finished `Prefill`."""
        start = self.done
        end = min(start + tokens, len(self.prompt))
        device = self.model.device
        ids = torch.tensor([self.prompt[start:end]], dtype=torch.long, device=device)
        positions = torch.arange(start, end, device=device).unsqueeze(0)
        out = self.model.run_steps(ids, positions, None, self.cache, self.steps)
        if self.every_position:
            self._every.append(_every_position(self.model, out, self.policy))
        if end < len(self.prompt):
            return None
        logits, exit_steps = self.model.readout(out, self.policy, position=-1)
        every = torch.cat(self._every) if self.every_position else None
        return Prefill(self.cache, [len(self.prompt)], logits, exit_steps, every)


def loop_policy(model: OuroForCausalLM, loop: LoopConfig) -> ExitPolicy:
    """The exit policy a loop configuration names, with the model's own defaults."""
    config = model.config
    return make_policy(loop.exit_policy, loop.exit_threshold, loop.steps, config.early_exit_threshold,
                       config.early_exit_step)


class Batch:
    def __init__(self, model: OuroForCausalLM, loop: LoopConfig, max_width: int) -> None:
        self.model, self.loop, self.max_width = model, loop, max_width
        config = model.config
        self.policy: ExitPolicy = loop_policy(model, loop)
        self.slots = loop.steps * config.num_hidden_layers
        self.rows: list = []  # row i of the buffer holds rows[i] (objects with start, next_position, last_token)
        self.length = 0
        self.keys = self.values = self.valid = None  # allocated on first join

    # -- buffers -------------------------------------------------------------------------------

    def _allocate(self, rows: int, width: int) -> None:
        """(Re)allocate for at least `rows` x `width`, keeping what is stored."""
        cap_rows = 0 if self.keys is None else self.keys.shape[1]
        cap_width = 0 if self.keys is None else self.keys.shape[3]
        if rows <= cap_rows and width <= cap_width:
            return
        new_rows = max(rows, min(2 * cap_rows, rows + 8)) if rows > cap_rows else cap_rows
        # Grow by half (at least 256 columns): a full per-step cache is large, so overshoot little.
        new_width = max(width, min(cap_width + max(256, cap_width // 2), self.max_width)) if width > cap_width else cap_width
        config = self.model.config
        shape = (self.slots, new_rows, config.num_key_value_heads, new_width, config.head_dim)
        keys = torch.zeros(shape, dtype=self.model.dtype, device=self.model.device)
        values = torch.zeros_like(keys)
        valid = torch.zeros(new_rows, new_width, dtype=torch.bool, device=self.model.device)
        if self.keys is not None and self.rows:
            used, length = len(self.rows), self.length
            keys[:, :used, :, :length] = self.keys[:, :used, :, :length]
            values[:, :used, :, :length] = self.values[:, :used, :, :length]
            valid[:used, :length] = self.valid[:used, :length]
        self.keys, self.values, self.valid = keys, values, valid

    def _shift(self, offset: int) -> None:
        """Move every stored column by `offset` (> 0: right, more padding; < 0: left, compaction)."""
        used, length = len(self.rows), self.length
        if offset == 0 or used == 0:
            return
        src = slice(0, length) if offset > 0 else slice(-offset, length)
        dst = slice(offset, length + offset) if offset > 0 else slice(0, length + offset)
        for buffer in (self.keys, self.values):
            buffer[:, :used, :, dst] = buffer[:, :used, :, src].clone()
        self.valid[:used, dst] = self.valid[:used, src].clone()
        if offset > 0:
            self.valid[:used, :offset] = False
        for row in self.rows:
            row.start += offset
        self.length += offset

    def compact(self, force: bool = False) -> None:
        """Drop the leading columns that are padding for every row. Unless forced, only when they are
        a good part of the width: moving the batch copies its whole cache."""
        if not self.rows:
            return
        first = min(row.start for row in self.rows)
        if first and (force or first >= max(32, self.length // 4)):
            self._shift(-first)

    def width_needed(self, prompt_len: int, remaining: int) -> int:
        """Buffer columns this batch would need, to the end, with one more row (after compaction).

        A row still to produce `remaining` tokens needs that many more columns."""
        length = self.length - min((row.start for row in self.rows), default=self.length)
        return max(length, prompt_len) + max([row.remaining for row in self.rows] + [remaining])

    def fits(self, prompt_len: int, remaining: int) -> bool:
        return self.width_needed(prompt_len, remaining) <= self.max_width

    # -- rows ----------------------------------------------------------------------------------

    def join(self, row, prefill: Prefill, index: int = 0) -> None:  # noqa: ANN001 - an engine Sequence
        """Append a prefilled row: row `index` of `prefill`, which holds its n prompt tokens."""
        n, cache = prefill.lengths[index], prefill.cache
        source = slice(cache.length - n, cache.length)
        wanted = max(self.length, n) + max([row.remaining for row in self.rows] + [row.remaining])
        self.compact(force=wanted > self.max_width)
        if not self.rows:
            self.length = 0
        width = max(self.length, n) + 1
        self._allocate(len(self.rows) + 1, width)
        if n > self.length:  # more left padding for the rows already here
            if self.rows:
                self._shift(n - self.length)
            else:
                self.length = n
        slot, begin = len(self.rows), self.length - n
        self.keys[:, slot, :, begin : self.length] = cache.keys[:, index, :, source]
        self.values[:, slot, :, begin : self.length] = cache.values[:, index, :, source]
        self.valid[slot] = False
        self.valid[slot, begin : self.length] = True
        row.start, row.next_position = begin, n
        self.rows.append(row)

    def leave(self, row) -> None:  # noqa: ANN001
        """Drop a row: the last buffer row moves into its place; its cache is freed for reuse."""
        index = self.rows.index(row)
        last = len(self.rows) - 1
        if index != last:
            for buffer in (self.keys, self.values):
                buffer[:, index, :, : self.length] = buffer[:, last, :, : self.length]
            self.valid[index, : self.length] = self.valid[last, : self.length]
            self.rows[index] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.length = 0
        self.compact()

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for every row. Returns logits `[B, V]` and the 0-based exit step of each row `[B]`."""
        used, length = len(self.rows), self.length
        if length + 1 > self.keys.shape[3]:
            self.compact(force=True)
            length = self.length
            self._allocate(used, length + 1)
        self.valid[:used, length] = True
        key_valid = self.valid[:used, : length + 1]
        if bool(key_valid.all()):
            key_valid = None
        device = self.model.device
        tokens = torch.tensor([[row.last_token] for row in self.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.next_position] for row in self.rows], dtype=torch.long, device=device)
        cache = KVCache.over(self.keys[:, :used], self.values[:, :used], self.loop.steps, length)
        logits, exit_steps = self.model.decode_step(
            tokens, positions, key_valid, cache, self.loop.steps, self.policy, self.loop.skip_compute
        )
        if self.loop.kv_mode == "shared":
            self._share_last_step(length, exit_steps)
        self.length = length + 1
        for row in self.rows:
            row.next_position += 1
        return logits, exit_steps

    def _share_last_step(self, column: int, exit_steps: torch.Tensor) -> None:
        """Shared-KV semantics: every step's slot at `column` gets the last computed step's K/V."""
        steps, layers = self.loop.steps, self.model.config.num_hidden_layers
        skipped = self.loop.skip_compute and self.policy.can_skip
        for buffer in (self.keys, self.values):
            view = buffer.view(steps, layers, *buffer.shape[1:])  # (T, L, B, H, S, D)
            for index in range(len(self.rows)):
                last = int(exit_steps[index]) if skipped else steps - 1
                view[:, :, index, :, column] = view[last, :, index, :, column].clone()
