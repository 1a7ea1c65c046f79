"""Token ids -> text deltas for one choice: detokenizing, stop strings and the `<think>` split.

`ChoiceText.push(token)` returns a `Delta` (reasoning text, answer text) that is safe to send
now: no partial UTF-8 character, no text that might still turn out to begin a stop string,
and no half of a `<think>` / `</think>` tag (a tag split across tokens is held back until it
is complete, by `text.ReasoningStream`). Text from the first stop string on is dropped and
`stopped` turns True. `finish()` returns whatever was held back once generation has ended.

With `split_reasoning=False` every piece of text is answer text, tags included.
"""

from __future__ import annotations

from dataclasses import dataclass

from looplm.text import ReasoningStream, _find_stop, _stop_prefix_len
from looplm.tokenizer import Tokenizer


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)

    def __iadd__(self, other: Delta) -> Delta:
        self.reasoning += other.reasoning
        self.content += other.content
        return self


class ChoiceText:
    def __init__(self, tokenizer: Tokenizer, stops: list[str], split_reasoning: bool, in_reasoning: bool = False):
        self._decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self._stops = stops
        self._held = ""
        self._reasoning = ReasoningStream(in_reasoning) if split_reasoning else None
        self.stopped = False
        self.saw_reasoning = in_reasoning and split_reasoning

    def push(self, token_id: int) -> Delta:
        if self.stopped:
            return Delta()
        self._held += self._decoder.push(token_id)
        cut = _find_stop(self._held, self._stops)
        if cut is not None:
            self._held, self.stopped = self._held[:cut], True
            return self.finish()
        ready = len(self._held) - _stop_prefix_len(self._held, self._stops)
        if ready <= 0:
            return Delta()
        text, self._held = self._held[:ready], self._held[ready:]
        return self._split(text)

    def finish(self) -> Delta:
        if not self.stopped:
            self._held += self._decoder.flush()
            cut = _find_stop(self._held, self._stops)
            self._held = self._held if cut is None else self._held[:cut]
        text, self._held = self._held, ""
        delta = self._split(text)
        if self._reasoning is not None:
            delta += self._pieces(self._reasoning.flush())
        return delta

    def _split(self, text: str) -> Delta:
        if self._reasoning is None:
            return Delta(content=text)
        return self._pieces(self._reasoning.feed(text))

    def _pieces(self, pieces: list[tuple[bool, str]]) -> Delta:
        delta = Delta()
        for is_reasoning, text in pieces:
            if is_reasoning:
                delta.reasoning += text
                self.saw_reasoning = True
            else:
                delta.content += text
        return delta
