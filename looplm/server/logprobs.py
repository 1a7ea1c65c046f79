"""OpenAI `logprobs` objects from the engine's per-token log-probabilities.

- chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}`;
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}`.

One entry per generated token, in order: reasoning tokens, a stop string's tokens and the eos
token included; with `echo`, the prompt's tokens come first (the very first has no log-probability:
nothing precedes it). A token's text is its own decode, special tokens spelled out; `bytes` is that
text in UTF-8, or null for a token that holds only part of a character (its decode alone is not
valid text). `text_offset` counts from the start of the choice's token texts.
"""

from __future__ import annotations

from looplm.server.engine import TokenLogprob
from looplm.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding part of a multi-byte character gives


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict:
    def described(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": None if REPLACEMENT in text else list(text.encode())}

    return {"content": [{**described(e.token, e.logprob), "top_logprobs": [described(t, lp) for t, lp in e.top]}
                        for e in entries]}


class CompletionLogprobs:
    """The legacy form for one choice, chunk by chunk (`text_offset` runs on across chunks)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.offset = tokenizer, 0

    def next(self, entries: list[TokenLogprob]) -> dict:
        texts = [token_text(self.tokenizer, e.token) for e in entries]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else {token_text(self.tokenizer, t): lp for t, lp in e.top}
                                 for e in entries],
                "text_offset": offsets}
