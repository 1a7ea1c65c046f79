"""Text in, text out: the layer the CLI and the server share.

`stream_text` turns a prompt (a string, or chat messages rendered with the model's chat
template) into token ids, runs `stream_generate`, and yields `TextChunk`s. Contract:
- chunk text never splits a UTF-8 character and never contains special tokens;
- generation ends at an eos id, a stop string or `max_new_tokens`; text from the first stop
  string on is cut, and text that could start a stop string is held back until it cannot;
- the last chunk, and only it, has `finish_reason` ("stop" | "length"), the prompt and new
  token ids, the mean exit step and the `GenerationStats`.
`ReasoningStream` splits streamed text into `<think>` reasoning and answer as it arrives.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from looplm.errors import GenerationError

if TYPE_CHECKING:
    from looplm.generate import GenerationStats
    from looplm.prompt_cache import PromptCache

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class TextChunk:
    text: str
    finish_reason: str | None = None  # set on the last chunk only
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # every new id, the one that ended generation included
    mean_exit_step: float | None = None
    stats: GenerationStats | None = None


def render_prompt(model, prompt: str | list[dict], enable_thinking: bool = False) -> str:  # noqa: ANN001
    """The prompt string itself, or chat messages rendered with an assistant turn opened."""
    if isinstance(prompt, str):
        return prompt
    return _tokenizer(model).apply_chat_template(prompt, add_generation_prompt=True, enable_thinking=enable_thinking)


def stream_text(
    model,  # noqa: ANN001 - OuroForCausalLM
    prompt: str | list[dict],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    exit_threshold: float | None = None,
    steps: int | None = None,
    stop: str | Sequence[str] | None = None,
    enable_thinking: bool = False,
    exit_policy: str | None = None,
    kv_mode: str = "full",
    skip_compute: bool = False,
    decoder: str = "dynamic",
    draft_steps: int | None = None,
    draft_tokens: int = 2,
    draft_confidence: float = 0.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int | str, float] | None = None,
    repetition_penalty: float = 1.0,
    min_p: float = 0.0,
    prompt_cache: PromptCache | None = None,
) -> Iterator[TextChunk]:
    # torch comes with looplm.generate: imported here, so the CLI's modules load without it
    from looplm.generate import GenerationStats, stream_generate

    tokenizer = _tokenizer(model)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise GenerationError(f"stop strings must be non-empty strings, got {stops!r}")
    # A plain string gets BOS if the tokenizer asks for it; a chat template writes its own.
    prompt_ids = tokenizer.encode(render_prompt(model, prompt, enable_thinking), isinstance(prompt, str))
    stats = GenerationStats()
    text_decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    held, new_ids, exit_steps, finish = "", [], [], "length"
    events = stream_generate(model, prompt_ids, max_new_tokens, temperature, top_p, top_k, seed, exit_threshold,
                             stop=stops or None, steps=steps, stats=stats, exit_policy=exit_policy,
                             kv_mode=kv_mode, skip_compute=skip_compute, decoder=decoder,
                             draft_steps=draft_steps, draft_tokens=draft_tokens, draft_confidence=draft_confidence,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             logit_bias=logit_bias, repetition_penalty=repetition_penalty, min_p=min_p,
                             prompt_cache=prompt_cache)
    # closing(): stream_generate holds torch.inference_mode open until it is closed.
    with closing(events):
        for event in events:
            new_ids.append(event.tokens[0])
            exit_steps.append(event.exit_steps[0])
            held += text_decoder.push(event.tokens[0])
            done = 0 in event.finished
            if done:
                finish = event.finished[0]
                held += text_decoder.flush()
            cut = _find_stop(held, stops)
            if cut is not None:
                held, finish = held[:cut], "stop"
                break
            if done:
                break
            ready = len(held) - _stop_prefix_len(held, stops)
            if ready > 0:
                yield TextChunk(held[:ready])
                held = held[ready:]
    mean_exit = sum(exit_steps) / len(exit_steps) if exit_steps else None
    yield TextChunk(held, finish, prompt_ids, new_ids, mean_exit, stats)


def _tokenizer(model):  # noqa: ANN001, ANN202
    if getattr(model, "tokenizer", None) is None:
        raise GenerationError(
            f"model '{getattr(model, 'source', '?')}' has no tokenizer (no tokenizer.json), so it cannot take text; "
            "add a tokenizer.json to the model directory or pass token ids to looplm.generate"
        )
    return model.tokenizer


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts, if any."""
    hits = [i for i in (text.find(s) for s in stops) if i != -1]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that a stop string starts with (0 if none)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def prompt_opens_reasoning(prompt: str) -> bool:
    """A Thinking chat template that ends the prompt with `<think>`: generation starts inside it."""
    return prompt.rstrip().endswith(THINK_OPEN)


class ReasoningStream:
    """Feed streamed text; get back `(is_reasoning, text)` pieces with the think tags removed.

    Start with `in_reasoning=True` when the prompt itself ended with `<think>`; a model that
    opens the block again anyway (`<think>` first, after whitespace at most) has that tag
    dropped too. A tag split across chunks is held back until it is complete.
    """

    def __init__(self, in_reasoning: bool = False) -> None:
        self.in_reasoning = in_reasoning
        self._held = ""
        self._may_reopen = in_reasoning  # the prompt opened the block; the reply may open it again

    def feed(self, text: str) -> list[tuple[bool, str]]:
        self._held += text
        if self._may_reopen:
            start = self._held.lstrip()
            if start.startswith(THINK_OPEN):
                self._held = start[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(start):
                return []  # whitespace or part of the tag so far: wait for more
            self._may_reopen = False
        pieces = []
        while True:
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            index = self._held.find(tag)
            if index == -1:
                break
            if index:
                pieces.append((self.in_reasoning, self._held[:index]))
            self._held = self._held[index + len(tag) :]
            self.in_reasoning = not self.in_reasoning
        ready = len(self._held) - _stop_prefix_len(self._held, [tag])
        if ready > 0:
            pieces.append((self.in_reasoning, self._held[:ready]))
            self._held = self._held[ready:]
        return pieces

    def flush(self) -> list[tuple[bool, str]]:
        """The held-back tail, once the stream has ended."""
        text, self._held = self._held, ""
        return [(self.in_reasoning, text)] if text else []
