"""Request and response bodies of the OpenAI-compatible API (pydantic).

Requests accept the standard OpenAI fields looplm honours, plus the looped-model extras
(`loops`, `exit_policy`, `exit_threshold`, `kv_mode`, `skip_compute`), which the `openai`
client sends through `extra_body`. Fields looplm does not know are ignored, as OpenAI-style
servers do; fields it knows but cannot honour (`tools`, a JSON `response_format`, `n` > 8, and
OpenAI's or vLLM's other output-changing options in `UNSUPPORTED_UNLESS`) are rejected with a
400 rather than silently dropped.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 8
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI allows

# Fields of OpenAI's API or of vLLM's extras that change the output and that looplm does not
# implement, each with the values that mean "off". Any other value gets a 400: ignoring it would
# answer a different request than the one sent.
UNSUPPORTED_UNLESS = {
    "tools": (None, []), "min_tokens": (None, 0),
    "best_of": (None, 1), "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0),
    "include_stop_str_in_output": (None, False),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "structured_outputs": (None,), "prompt_logprobs": (None,), "functions": (None, []),
    "function_call": (None, "none"), "tool_choice": (None, "none"), "prediction": (None,),
    "modalities": (None, ["text"]), "audio": (None,), "suffix": (None, ""),
}


class LoopOptions(BaseModel):
    """Per-request loop control (looplm extras)."""

    # 1-8, or up to the model's own count when it has more (checked by the engine)
    loops: int | None = Field(None, ge=1, description="UT steps available (default: the model's)")
    exit_policy: Literal["last", "gate", "confidence", "kl", "fixed", "weighted"] | None = None
    exit_threshold: float | None = Field(None, ge=0.0, le=1.0)
    kv_mode: Literal["full", "shared"] = "full"
    skip_compute: bool = False


class SamplingOptions(LoopOptions):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # as in vLLM, a request without one asks for the served model
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's range (int64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a JSON key) -> value in [-100, 100]
    # vLLM's extras: HF's repetition penalty (prompt and output, 1 = off), min-p sampling (0 = off),
    # running past the model's eos ids, and more ids to end at (their text is left out)
    repetition_penalty: float | None = Field(None, gt=0.0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_would_be_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, off in UNSUPPORTED_UNLESS.items():
                if name in data and not any(data[name] == value and type(data[name]) is type(value) or
                                            data[name] is value for value in off):
                    raise ValueError(f"{name} {json.dumps(data[name])[:80]} is not supported by looplm")
        return data

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    @field_validator("response_format")
    @classmethod
    def _plain_text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(f"type {value.get('type')!r} is not supported by looplm (only 'text')")
        return value

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def logprob_alternatives(self) -> int | None:
        """None: no log-probabilities; k: each token's and its k likeliest alternatives."""
        return None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role; templates see it as "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        """Content as one string (the OpenAI list-of-parts form is joined; only text parts)."""
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(SamplingOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    # Put text inside <think>...</think> into `reasoning_content` (False: everything in `content`).
    split_reasoning: bool = True
    # Passed to the chat template (opens a <think> block for Thinking templates).
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def thinking(self) -> bool:
        if self.enable_thinking is not None:
            return self.enable_thinking
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", False))


class CompletionRequest(SamplingOptions):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids (as OpenAI's API allows)
    echo: bool = False  # the prompt text comes before the completion, and its log-probabilities first
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only

    @model_validator(mode="after")
    def _zero_tokens_needs_echo(self) -> CompletionRequest:
        if self.token_budget == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only for scoring a prompt (echo: true)")
        return self

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_forms(cls, value: Any) -> Any:
        """One message for every wrong shape, instead of pydantic's per-branch complaints."""
        def ids(item: Any) -> bool:
            return isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)

        if isinstance(value, str) or (ids(value) and value):
            return value
        if isinstance(value, list) and (all(isinstance(p, str) for p in value) or all(ids(p) for p in value)):
            return value
        raise ValueError("give a string, a list of strings, a list of token ids or a list of token-id lists")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list) -> str | list:
        if _token_ids(value):
            return value  # one prompt of token ids
        if isinstance(value, list) and not 1 <= len(value) <= MAX_N:
            raise ValueError(f"give 1 to {MAX_N} prompts")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt, as text or as token ids."""
        if isinstance(self.prompt, str) or _token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)


def _token_ids(prompt: object) -> bool:
    """One prompt given as token ids (a list of ints), not a list of prompts."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM's shape, which lm-evaluation-harness's remote tokenizer calls)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
