"""Tokenizer, chat template and streaming detokenization for looplm.

Contract:
- ``Tokenizer`` wraps a ``tokenizers.Tokenizer``. ``encode`` never runs the tokenizer's own
  post-processor; it prepends BOS only when the tokenizer was configured with ``add_bos`` *and*
  the caller asks for ``add_special_tokens``. Special-token strings inside the text (e.g.
  ``<|im_end|>``) are always parsed as their special ids, which is what chat prompts need.
- ``apply_chat_template`` renders the model's jinja template (or a built-in ChatML fallback) in
  an immutable sandbox, because templates downloaded from a hub are untrusted input. Every
  failure (bad messages, broken or malicious template) is a one-line ``TokenizerError``.
- ``StreamDecoder`` turns ids into text incrementally: the concatenation of everything
  ``push`` and ``flush`` return equals ``Tokenizer.decode`` of all ids, and ``push`` never
  returns a partial UTF-8 character for well-formed text.
- ``byte_level_tokenizer`` builds the 259-id byte-level tokenizer of the tiny random model.
- ``split_reasoning`` separates ``<think>...</think>`` reasoning from the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers

from looplm.errors import TokenizerError

__all__ = ["Tokenizer", "StreamDecoder", "byte_level_tokenizer", "split_reasoning", "CHATML_TEMPLATE"]

# Rendered exactly like a hub template (trim_blocks/lstrip_blocks); the jinja string literals
# hold real newlines, so the block tags' own line breaks are the only ones trimmed.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking %}{{ '<think>\n' }}{% endif %}{% endif %}"
)

_ROLES = frozenset({"system", "user", "assistant", "tool"})
_REPLACEMENT = "\ufffd"  # what a lossy UTF-8 decode yields for an incomplete byte sequence


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _raise_exception(message: str) -> None:  # templates call it to reject a conversation
    raise TokenizerError(f"chat template rejected the messages: {_one_line(message)}")


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as "<s>" or {"content": "<s>", ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# Special tokens that end a chat turn: ChatML's (Ouro, SmolLM2, Qwen), Llama 3's, Phi-3's, Gemma's.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus chat template and special-token metadata."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self._tok = tok
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.add_bos = add_bos
        self._compiled: tuple[str, jinja2.Template] | None = None  # (source, template)
        self.special_ids: set[int] = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_dir(cls, path: Path | str) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{tok_file} not found; point to a model directory that contains tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises plain Exception for bad JSON
            raise TokenizerError(f"{tok_file} is corrupt ({_one_line(exc)[:160]}); re-download it") from exc
        config, template = _read_config(path)
        return cls(
            tok,
            chat_template=template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            add_bos=bool(config.get("add_bos_token", False)),
        )

    def save(self, path: Path | str) -> None:
        """Write tokenizer.json and tokenizer_config.json into the directory `path`."""
        path = Path(path)
        self._tok.save(str(path / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "add_bos_token": self.add_bos}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    # -- ids <-> text ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def end_of_turn_ids(self) -> set[int]:
        """Ids of the special tokens that close a chat turn (`<|im_end|>` in Ouro's ChatML). Ouro's
        shipped configs name only `<|endoftext|>` (0) as eos, so without these a chat reply runs
        past its turn (the spec's "never-ending continuations")."""
        ids = {self.token_to_id(token) for token in END_OF_TURN_TOKENS}
        return {i for i in ids if i is not None and i in self.special_ids}

    @cached_property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes one token decodes to: a text of N bytes is at least
        N / longest_token_bytes tokens, a bound the server checks before tokenizing a huge body."""
        size = self._tok.get_vocab_size(with_added_tokens=True)
        return max(len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8", "replace"))
                   for i in range(size))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}; pass text, not ids")
        # The post-processor is bypassed on purpose: BOS handling is ours alone (see docstring).
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side refuses a str it cannot hold as UTF-8
            _check_encodable(text)
            raise
        bos = self.bos_id
        if add_special_tokens and self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once (no BOS), using the Rust side's threads; for building corpora."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # int() accepts numpy/torch scalars as well as Python ints.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
    ) -> str:
        _validate_messages(messages)
        try:
            return self._template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   enable_thinking=enable_thinking, bos_token=self.bos_token or "",
                                   eos_token=self.eos_token or "")
        except TokenizerError:
            raise
        except Exception as exc:  # SecurityError, UndefinedError, TypeError inside the template...
            raise TokenizerError(
                f"chat template failed to render ({type(exc).__name__}: {_one_line(exc)[:200]}); "
                "fix chat_template in tokenizer_config.json or remove it to use ChatML"
            ) from exc

    def _template(self) -> jinja2.Template:
        # Compiled lazily (a broken template only breaks chat use), recompiled if chat_template changes.
        source = self.chat_template or CHATML_TEMPLATE
        if self._compiled is None or self._compiled[0] != source:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_exception
            # Hub templates expect tojson to keep non-ASCII text readable (jinja's escapes HTML).
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
            try:
                self._compiled = (source, env.from_string(source))
            except jinja2.TemplateError as exc:
                raise TokenizerError(
                    f"chat template does not parse ({_one_line(exc)[:200]}); "
                    "fix chat_template in tokenizer_config.json or remove it to use ChatML"
                ) from exc
        return self._compiled[1]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{file} is unreadable ({_one_line(exc)}); re-download it or delete it") from exc


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """Parse optional tokenizer_config.json; return it and the chat template it selects."""
    cfg_file = path / "tokenizer_config.json"
    config: Any = {}
    if cfg_file.is_file():
        try:
            config = json.loads(_read_text(cfg_file))
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"{cfg_file} is not valid JSON ({exc}); re-download it or delete it") from exc
        if not isinstance(config, dict):
            raise TokenizerError(f"{cfg_file} must hold a JSON object; re-download it or delete it")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Multi-template form: [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if not isinstance(template, str):
            raise TokenizerError(f"{cfg_file} lists chat templates but none named 'default'; add one")
    elif template is not None and not isinstance(template, str):
        raise TokenizerError(f"{cfg_file}: chat_template must be a string or a list of {{name, template}}")
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():  # newer hub repos ship the template separately
        template = _read_text(jinja_file)
    return config, template


def first_lone_surrogate(text: str) -> int | None:
    """Where `text` stops being Unicode text with UTF-8 bytes to tokenize (its first lone
    surrogate: JSON's "\\ud800", or a byte that was not UTF-8, which Python hands over in
    arguments as U+DC80..U+DCFF), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _check_encodable(text: str) -> None:
    index = first_lone_surrogate(text)
    if index is not None:
        raise TokenizerError(f"text is not valid Unicode: a lone surrogate {text[index]!r} at character {index}")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise TokenizerError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise TokenizerError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or role not in _ROLES:
            raise TokenizerError(f"messages[{i}] has role {role!r}; use one of {', '.join(sorted(_ROLES))}")
        if not isinstance(content, str):
            raise TokenizerError(f"messages[{i}] content must be a string, got {type(content).__name__}")


class StreamDecoder:
    """Incremental detokenizer using the prefix-offset / read-offset window.

    ``ids[prefix:read]`` was already emitted and is decoded again only as context, so decoders
    that treat a window's first token specially (leading-space stripping) cancel out;
    ``ids[read:]`` is pending. Decoding just this window keeps the cost per token constant.
    Pending text is held while it ends in U+FFFD: a multi-byte character is still incomplete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def _pending(self) -> str:
        done = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        full = self._tokenizer.decode(self._ids[self._prefix :], self._skip)
        # A window that starts and ends on character boundaries decodes to done + new text.
        return full[len(done) :]

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._pending()
        if not text or text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        text = self._pending()
        self._prefix = self._read = len(self._ids)
        return text


def byte_level_tokenizer() -> Tokenizer:
    """The no-merges byte-level BPE of the tiny random model: 3 special ids + 256 byte ids."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # sorted: set order is not stable
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Already in the vocab, so they keep ids 0..2; registering them makes them special.
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    return Tokenizer(tok, chat_template=None, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split ``<think>reasoning</think>answer`` into (reasoning or None, answer), both stripped.

    Handles a missing opening tag (the prompt already ended with ``<think>``) and an
    unterminated ``<think>`` (generation stopped while reasoning: everything is reasoning).
    Empty reasoning (e.g. ``<think>\\n\\n</think>``) is reported as None.
    """
    start, end = text.find("<think>"), text.find("</think>")
    if start != -1 and (end == -1 or start < end):
        before, rest = text[:start], text[start + len("<think>") :]
        end = rest.find("</think>")
        if end == -1:
            reasoning, answer = rest, before
        else:
            reasoning, answer = rest[:end], before + rest[end + len("</think>") :]
    elif end != -1:
        reasoning, answer = text[:end], text[end + len("</think>") :]
    else:
        return None, text.strip()
    reasoning = reasoning.strip()
    if reasoning.startswith("<think>"):  # the prompt opened the block and the reply opened it again
        reasoning = reasoning[len("<think>"):].strip()
    return (reasoning or None), answer.strip()
