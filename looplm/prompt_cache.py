"""Keep one conversation's KV cache between requests, so each turn prefills only what is new.

A chat sends its whole history with every message. On a CPU a prompt pass costs far more per
token than a decode step (the Ouro-1.4B shape prefills about 13 tokens a second on two cores),
so re-reading a long history each turn is most of the wait. `PromptCache` remembers the token
ids whose keys and values it holds; the next request keeps the longest prefix it shares with
them and runs only the rest. The history a chat template renders again need not match what was
generated (a Thinking model's reasoning is dropped from it): the cache keeps what still matches.

The tokens come out as they would from a fresh prompt pass, up to floating-point order: the
kept prefix was computed in another pass than the rest (tested in fp32).

Only the dynamic decode step with the full KV cache, one sequence, every loop computed:
`kv_mode="shared"` and `skip_compute` store other K/V for decoded tokens than a prompt pass
would, and the static and speculative decoders keep caches of their own.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from looplm.errors import GenerationError

if TYPE_CHECKING:  # types only: the model makes the cache
    from looplm.cache import KVCache
    from looplm.models.ouro import OuroForCausalLM

CAPACITY_BUCKET = 256  # grow the buffers in steps of this many positions, not every turn
T = TypeVar("T")


@dataclass
class PromptCache:
    """The K/V of `ids` (one sequence) for `steps` loops (`GenerationStats.cached_tokens` says how
    many prompt tokens a request kept)."""

    cache: KVCache | None = None
    ids: list[int] = field(default_factory=list)  # the tokens in `cache`, position by position
    steps: int | None = None
    model: weakref.ref | None = field(default=None, repr=False)  # whose K/V `cache` holds
    in_use: bool = field(default=False, repr=False)  # a generation is writing into `cache`

    def clear(self) -> None:
        """Forget the conversation (and free its buffers)."""
        self.cache, self.ids, self.steps, self.model = None, [], None, None

    def hold(self, tokens: Iterator[T]) -> Iterator[T]:
        """`tokens` (a generation using this cache), refused while another generation uses it: the
        two would write their K/V and token ids into one buffer."""
        if self.in_use:
            raise GenerationError("this PromptCache is in use by a generation still running; give each "
                                  "conversation in flight a PromptCache of its own")
        self.in_use = True
        try:
            yield from tokens
        finally:
            self.in_use = False

    def prepare(self, model: OuroForCausalLM, prompt: list[int], capacity: int, steps: int) -> tuple[KVCache, int]:
        """The cache to generate `prompt` with, holding `capacity` positions, and how many prompt
        tokens it already holds. At most all but the last: the last prompt token is always run,
        since its logits give the first new token."""
        kept = self._shared_prefix(model, prompt, steps)
        if self.cache is None or self.cache.max_len < capacity or kept == 0:
            size = -(-capacity // CAPACITY_BUCKET) * CAPACITY_BUCKET
            if kept:  # a conversation growing: double, so that the copies below happen every few turns, not each
                size = max(size, min(2 * self.cache.max_len, model.config.max_position_embeddings))
            bigger = model.make_cache(1, size, steps, zeroed=False)  # written before read, as in generate
            if kept:
                bigger.keys[..., :kept, :] = self.cache.keys[..., :kept, :]
                bigger.values[..., :kept, :] = self.cache.values[..., :kept, :]
            self.cache = bigger
        self.model = weakref.ref(model)
        self.cache.length = kept
        self.ids, self.steps = list(prompt[:kept]), steps
        return self.cache, kept

    def _shared_prefix(self, model: OuroForCausalLM, prompt: list[int], steps: int) -> int:
        cache = self.cache
        if cache is None or self.model is None or self.model() is not model or self.steps != steps:
            return 0  # another model's K/V (or another loop count's) serve nothing here
        if cache.keys.dtype != model.dtype or cache.keys.device != model.device:  # the model moved since
            return 0
        return reusable_prefix(self.ids[: cache.length], prompt)


def reusable_prefix(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading tokens of `prompt` `held` shares, at most all but the last prompt token:
    that one always runs, since its logits give the first new token."""
    limit = min(len(held), len(prompt) - 1)
    shared = 0
    while shared < limit and held[shared] == prompt[shared]:
        shared += 1
    return shared
