"""One HTTP request's generation: submit its sequences, turn engine events into choice deltas.

`Session` runs on the event loop. It submits one engine `Sequence` per choice (n choices per
prompt), receives their events through one `asyncio.Queue` (the engine thread hands them over
with `call_soon_threadsafe`), and yields `(index, Delta, finish_reason)` as text becomes
ready. A stop string cancels its sequence in the engine. `close()` cancels whatever still
runs (client gone, error); call it in a `finally`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from looplm.sampling import SamplingParams
from looplm.server.batch import LoopConfig
from looplm.server.engine import Engine, Event, Sequence, TokenLogprob
from looplm.server.reasoning import ChoiceText, Delta
from looplm.tokenizer import Tokenizer

DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


class EngineFailed(Exception):
    """A sequence got an `error` event from the engine."""


@dataclass
class Choice:
    index: int
    sequence: Sequence
    text: ChoiceText
    tokens: int = 0
    loops: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet handed out with a delta


class Session:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, eos_ids: frozenset[int],
                 silent_ids: frozenset[int] = frozenset()) -> None:
        """`eos_ids` end a choice; `silent_ids` (a request's `stop_token_ids`) also add no text."""
        self.engine, self.tokenizer, self.eos_ids, self.silent_ids = engine, tokenizer, eos_ids, silent_ids
        self.choices: list[Choice] = []
        self.prompt_tokens = 0
        self._first_choices: list[Sequence] = []  # one per prompt: its choices share the prompt pass
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def submit(
        self,
        prompts: list[list[int]],
        n: int,
        max_tokens: int | None,
        loop: LoopConfig,
        sampling: SamplingParams,
        seed: int | None,
        stops: list[str],
        split_reasoning: bool,
        in_reasoning: bool,
        logprobs: int | None = None,
        echo_logprobs: bool = False,
    ) -> None:
        """Queue every choice; raises `QueueFull` (after cancelling what was queued) or `GenerationError`.
        `logprobs`: None, or how many alternatives to report beside each token's log-probability;
        `echo_logprobs`: report the prompt tokens' too, first (then `max_tokens` may be 0).
        `max_tokens=None`: each prompt may fill the rest of the context."""
        try:
            for prompt in prompts:
                self.prompt_tokens += len(prompt)
                for choice in range(n):
                    index = len(self.choices)
                    choice_seed = None if seed is None else seed + index
                    budget = self.engine.max_context - len(prompt) if max_tokens is None else max_tokens
                    seq = Sequence(prompt, budget, loop, sampling, choice_seed, self.eos_ids, self._hand_off(index),
                                   logprobs, echo_logprobs)
                    if choice == 0:
                        self._first_choices.append(seq)
                    text = ChoiceText(self.tokenizer, stops, split_reasoning, in_reasoning)
                    self.choices.append(Choice(index, seq, text))
                    self.engine.submit(seq)
        except Exception:
            self.close()
            raise

    def _hand_off(self, index: int) -> Callable[[Event], None]:
        def put(event: Event) -> None:  # runs on the engine thread
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

        return put

    async def deltas(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, Delta, str | None, list[TokenLogprob]]]:
        """Yield `(choice index, delta, finish_reason or None, logprobs)` until every choice has finished.

        `logprobs` holds the tokens generated since the choice's last yield (empty unless asked
        for): a token whose text is still held back (an incomplete character, a possible stop
        string) reports with the text that follows it.

        `disconnected` (non-streaming requests) is polled while waiting; the session then ends
        quietly and the caller's `close()` frees the engine rows.
        """
        pending = {c.index for c in self.choices}
        checked = time.monotonic()
        while pending:
            try:
                index, event = await asyncio.wait_for(self._queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                index, event = None, None
            if disconnected is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                if await disconnected():
                    return
                checked = time.monotonic()
            if event is None:
                continue
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue  # tokens that were already in flight when a stop string ended it
            if event.kind == "error":
                raise EngineFailed(event.message or "generation failed")
            if event.kind == "prompt":  # handed out with the first text
                choice.logprobs[:0] = event.prompt_logprobs or []
                continue
            if event.kind == "token":
                choice.tokens += 1
                choice.loops += event.loops or 0
                if event.logprob is not None:
                    choice.logprobs.append(event.logprob)
                delta = Delta() if event.token in self.silent_ids else choice.text.push(event.token)
                if choice.text.stopped:
                    choice.finish_reason = "stop"
                    self.engine.cancel(choice.sequence)
            else:
                delta = choice.text.finish()
                choice.finish_reason = event.finish_reason
            if choice.finish_reason is not None:
                pending.discard(index)
            if delta or choice.finish_reason is not None:
                logprobs, choice.logprobs = choice.logprobs, []
                yield index, delta, choice.finish_reason, logprobs

    def close(self) -> None:
        for choice in self.choices:
            if choice.finish_reason is None:
                self.engine.cancel(choice.sequence)

    def usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        loops = sum(c.loops for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            # OpenAI's field: prompt tokens whose K/V an earlier request left (the server's prefix store)
            "prompt_tokens_details": {"cached_tokens": sum(seq.cached_tokens for seq in self._first_choices)},
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "mean_loops_per_token": round(loops / completion, 4) if completion else None,
        }
