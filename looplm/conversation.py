"""A chat conversation as OpenAI-style messages: read and write it as JSON, fit it to the context.

The file form is `{"messages": [{"role": ..., "content": ...}, ...]}`, the body of a chat request,
so a saved conversation is also a request for the server or `looplm batch`.
"""

from __future__ import annotations

import json
from pathlib import Path

from looplm.errors import LooplmError

ROLES = ("system", "user", "assistant")


def read_messages(path: Path | str) -> list[dict]:
    """The messages of a conversation file, checked: a JSON object with `messages` (or a bare list),
    each a system (first only), user or assistant message with text content."""
    from looplm.tokenizer import first_lone_surrogate  # tokenizers and jinja2: not at the CLI's start

    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LooplmError(f"conversation file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise LooplmError(f"conversation file {path} is not a readable JSON file ({reason})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise LooplmError(f"conversation file {path}: expected {{\"messages\": [...]}} or a list of messages")
    for number, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise LooplmError(f"conversation file {path}: message {number} is not a "
                              '{"role": system|user|assistant, "content": text} object')
        if message["role"] == "system" and number > 0:
            raise LooplmError(f"conversation file {path}: only the first message may be a system message")
        bad = first_lone_surrogate(message["content"])  # JSON's "\ud800": no model could take it, nor /save write it
        if bad is not None:
            raise LooplmError(f"conversation file {path}: message {number} holds a lone surrogate "
                              f"{message['content'][bad]!r}, which is not Unicode text")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def write_messages(path: Path | str, messages: list[dict]) -> None:
    """Write the conversation file (OSError when the file cannot be written) through
    `looplm.output_files.replace_text`: a full disk or a crash leaves the file as it was, never cut
    off, and a file that existed keeps its permissions (a conversation kept private stays private)."""
    from looplm.output_files import replace_text

    replace_text(path, json.dumps({"messages": messages}, ensure_ascii=False, indent=1) + "\n")


def fit_context(model, history: list[dict], keep: int, max_new_tokens: int,  # noqa: ANN001
                enable_thinking: bool = False) -> int:
    """Drop the oldest exchanges (a user message and its reply), never the first `keep` messages
    (the system prompt) nor the newest message, until the rendered prompt and the reply's budget fit
    the model's context; the number of exchanges dropped. If the newest message does not fit even
    with every exchange dropped, nothing is dropped and generation says it is too long.

    Once it must drop, it drops until the prompt takes at most 3/4 of its budget: the turns after
    that add to a history that stays put, so their prompts keep the K/V of the one before (a
    `PromptCache`) instead of shifting by one exchange, and being read again whole, every turn."""
    from looplm.text import render_prompt

    limit = model.config.max_position_embeddings - max_new_tokens

    def fits(messages: list[dict], budget: int) -> bool:
        return len(model.tokenizer.encode(render_prompt(model, messages, enable_thinking))) <= budget

    if fits(history, limit):
        return 0
    room = limit - limit // 4
    trial, dropped = list(history), 0
    while len(trial) > keep + 1 and not fits(trial, room):
        del trial[keep : keep + 2 if len(trial) > keep + 2 else keep + 1]
        dropped += 1
    if not fits(trial, limit):  # too long even alone: dropping turns would lose them for nothing
        return 0
    history[:] = trial
    return dropped


__all__ = ["ROLES", "fit_context", "read_messages", "write_messages"]
