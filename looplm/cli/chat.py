"""`looplm chat`: a multi-turn REPL over the model's chat template.

Reads one user message per line (from a terminal or piped stdin), or several lines between
\"\"\" fences. `<think>` reasoning is streamed dimmed and kept apart from the answer; only
answers go back into the history.
`--show-steps` prints, after each reply, the mean loops per token and the loops skipping saved.
A chat template that cannot render a conversation stops the command before the first message;
with piped input, a message that got no reply makes the command exit 1 at the end. When the
conversation outgrows the context, its oldest exchanges leave it (the system prompt stays), but
only for a message that then fits and gets its reply: one that fails leaves the history whole.
`/save FILE` writes the conversation as `{"messages": [...]}` (OpenAI's form: a request body for
`looplm batch` or the server), and `--load FILE` starts from such a file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.text import Text

from looplm.cli import common
from looplm.conversation import fit_context, read_messages, write_messages
from looplm.errors import LooplmError
from looplm.text import THINK_OPEN, ReasoningStream, prompt_opens_reasoning, render_prompt, stream_text
from looplm.tokenizer import split_reasoning

if TYPE_CHECKING:
    from looplm.generate import GenerationStats
    from looplm.prompt_cache import PromptCache

HELP = ('commands: /reset clears the history, /save FILE writes it as JSON, /exit quits (so does Ctrl-D); '
        'a message between """ and """ may span lines')
FENCE = '"""'


@common.app.command()
def chat(
    model: common.Model = None,
    dtype: common.Dtype = "bfloat16",
    device: common.Device = "auto",
    steps: common.Steps = None,
    quant: common.Quant = None,
    group_size: common.GroupSize = None,
    max_new_tokens: common.MaxNewTokens = 512,
    temperature: common.Temperature = None,
    top_p: common.TopP = None,
    top_k: common.TopK = None,
    exit_threshold: common.ExitThreshold = None,
    seed: common.Seed = None,
    threads: common.Threads = None,
    presence_penalty: common.PresencePenalty = 0.0,
    frequency_penalty: common.FrequencyPenalty = 0.0,
    repetition_penalty: common.RepetitionPenalty = None,
    min_p: common.MinP = None,
    stop: common.Stop = None,
    exit_policy: common.ExitPolicyName = None,
    kv_mode: common.KvMode = "full",
    skip_compute: common.SkipCompute = False,
    decoder: common.Decoder = "auto",
    draft_steps: common.DraftSteps = None,
    draft_tokens: common.DraftTokens = None,
    draft_confidence: common.DraftConfidence = None,
    system: Annotated[Optional[str], common.option("System prompt.", default_in_help=True)] = None,
    think: Annotated[bool, common.option("Open a <think> block in the prompt (enable_thinking).", "--think")] = False,
    hide_think: Annotated[bool, common.option("Do not show <think> reasoning.", "--hide-think")] = False,
    show_steps: Annotated[bool, common.option(
        "After each reply, print the mean loops per token and, with --skip-compute, the loops saved.", "--show-steps"
    )] = False,
    load: Annotated[Optional[Path], common.option(
        "Start from a conversation saved with /save (or any JSON {\"messages\": [...]} of system, user and "
        "assistant messages).", default_in_help=True)] = None,
) -> None:
    """Chat with the model; one message per line (or lines between \"\"\" fences), /reset, /save FILE, /exit."""
    sampling = common.SamplingOptions(max_new_tokens, temperature, top_p, top_k, exit_threshold, seed, stop,
                                      presence_penalty, frequency_penalty, repetition_penalty, min_p)
    exits = common.DecodeOptions(exit_policy, kv_mode, skip_compute, decoder, draft_steps, draft_tokens,
                                 draft_confidence)
    exits.check_threshold(exit_threshold)
    if system is not None:
        common.check_text(system, "--system")
    loaded = read_messages(load) if load is not None else []
    if system and loaded and loaded[0]["role"] == "system":
        raise LooplmError(f"{load} has its own system message; leave out --system")
    common.set_threads(threads)
    lm = common.load_model(model, dtype, device, steps, quant, group_size, needs_text=True)
    context = lm.config.max_position_embeddings
    if max_new_tokens >= context:  # every message would fail, each with a hint that cannot help
        raise LooplmError(f"--max-new-tokens {max_new_tokens} leaves no room for a message in the model's context "
                          f"of {context} tokens; give fewer")
    options = {**sampling.for_model(lm), **exits.as_kwargs(), "prompt_cache": conversation_cache(lm, exits)}
    session = ChatSession(lm, options, think, hide_think, show_steps, system, loaded)
    interactive = sys.stdin.isatty()
    common.read_stdin_leniently()  # a line that is not UTF-8 fails alone, in `send`
    if interactive:
        common.stderr().print(HELP, style="dim")
    while True:
        try:
            line, fenced = read_message(interactive)
        except EOFError:
            break
        if not line:
            continue
        if fenced or not line.startswith("/"):
            session.send(line)
        elif not session.command(line):
            break
    if not interactive:  # a script feeding messages must see that some got no reply
        session.report_failures()


class ChatSession:
    """The conversation of one `looplm chat`: its messages, the /commands, and what failed."""

    def __init__(self, lm, options: dict, think: bool, hide_think: bool, show_steps: bool,  # noqa: ANN001
                 system: str | None, loaded: list[dict]) -> None:
        self.lm, self.options, self.think, self.hide_think, self.show_steps = lm, options, think, hide_think, show_steps
        loaded_system = loaded[:1] if loaded and loaded[0]["role"] == "system" else []
        self.start = [{"role": "system", "content": system}] if system else loaded_system  # kept by /reset
        self.history = self.start + loaded[len(loaded_system):]
        self.sent = self.failed = self.saves_failed = 0
        # Fail before reading input when no message could ever render (broken template, no tokenizer).
        render_prompt(lm, [*self.start, {"role": "user", "content": "hello"}], think)

    def command(self, line: str) -> bool:
        """Run a /command; False when it ends the chat."""
        command, _, argument = line.partition(" ")
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            self.history = list(self.start)
            if self.options["prompt_cache"] is not None:
                self.options["prompt_cache"].clear()
            common.stderr().print("(history cleared)", style="dim")
        elif command == "/save":
            self.saves_failed += not _save(self.history, argument.strip())
        else:
            common.stderr().print(f"unknown command {line}; {HELP}", style="dim")
        return True

    def send(self, message: str) -> None:
        """Stream the reply to one user message; a message that gets none leaves the history as it
        was, the turns dropped to fit it included."""
        history = [*self.history, {"role": "user", "content": message}]
        self.sent += 1
        try:
            common.check_text(message, "the message")
        except LooplmError as exc:  # before the try below: /reset would not help with this one
            common.stderr().print(f"error: {common.one_line(exc)}")
            self.failed += 1
            return
        try:
            dropped = fit_context(self.lm, history, len(self.start), self.options["max_new_tokens"], self.think)
            if dropped:
                common.stderr().print(f"(the {dropped} oldest turn{'s' if dropped > 1 else ''} left the "
                                      "conversation to fit the context)", style="dim")
            reply, stats = _stream_reply(self.lm, history, self.options, self.think, self.hide_think)
            if self.show_steps and stats is not None:
                common.stderr().print(steps_line(stats), style="dim")
        except LooplmError as exc:  # e.g. the message alone is longer than the context: the REPL goes on
            common.stderr().print(f"error: {common.one_line(exc)} (/reset starts over)")
            reply = None
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            sys.stdout.write("\n")
            reply = None
        if reply is None:
            self.failed += 1
        else:
            self.history = [*history, {"role": "assistant", "content": split_reasoning(reply)[1]}]

    def report_failures(self) -> None:
        """Name the messages that got no reply and the /saves that failed, and exit 1 if any did."""
        if self.failed:
            common.stderr().print(f"error: {self.failed} of {self.sent} messages got no reply")
        if self.saves_failed:
            plural = "s" if self.saves_failed > 1 else ""
            common.stderr().print(f"error: {self.saves_failed} /save command{plural} failed")
        if self.failed or self.saves_failed:
            raise typer.Exit(common.EXIT_ERROR)


def read_message(interactive: bool) -> tuple[str, bool]:
    """One message and whether it was fenced: a line, or the lines from one that starts with \"\"\"
    to one that ends with it (pasted text keeps its lines, and is never a /command). EOFError when
    the input ends before a message starts."""
    line = input(">>> " if interactive else "").strip()
    if not line.startswith(FENCE):
        return line, False
    lines = [line[len(FENCE):]]
    while not lines[-1].endswith(FENCE):
        try:
            lines.append(input("... " if interactive else ""))
        except EOFError:  # the input ended inside the message: send what there is
            return "\n".join(lines).strip(), True
    lines[-1] = lines[-1][: -len(FENCE)]
    return "\n".join(lines).strip(), True


def _save(history: list[dict], target: str) -> bool:
    """`/save FILE`: the conversation as JSON; a failure is one line and the chat goes on."""
    if not target:
        common.stderr().print("error: /save needs a file name: /save FILE")
        return False
    path = Path(target).expanduser()
    try:
        write_messages(path, history)
    except OSError as exc:
        common.stderr().print(f"error: cannot write {path} ({exc.strerror or exc})")
        return False
    common.stderr().print(f"(saved {len(history)} messages to {path})", style="dim")
    return True


def conversation_cache(lm, exits: common.DecodeOptions) -> PromptCache | None:  # noqa: ANN001
    """A cache that carries the conversation's K/V from turn to turn, so each turn's prompt pass runs
    only what the last turn did not already hold. None where the options decode through K/V of
    their own: a static decoder (CUDA's default), shared KV, compute skipping, speculative drafts."""
    from looplm.generate import resolve_decoder
    from looplm.prompt_cache import PromptCache

    drafting = exits.draft_steps is not None
    decoder = resolve_decoder(exits.decoder, lm, True, exits.kv_mode, exits.skip_compute, drafting=drafting)
    if decoder != "dynamic" or exits.kv_mode != "full" or exits.skip_compute or drafting:
        return None
    return PromptCache()


def steps_line(stats: GenerationStats) -> str:
    """One line on the loops a reply used, from its `GenerationStats`, and the prompt tokens the
    conversation's cache spared the prompt pass."""
    total = stats.steps_available
    line = f"mean steps per token {stats.mean_steps:.2f} of {total}"
    if stats.skipping:
        possible = stats.loops_possible
        share = stats.loops_saved / possible if possible else 0.0
        line += f" | loops saved {stats.loops_saved} of {possible} ({share:.0%}; the first token comes from the prefill)"
    else:  # the policy only picked which loop's logits to read: every loop still ran
        line += " | loops saved 0 (every loop ran; saving needs --skip-compute and a policy that exits early)"
    if stats.cached_tokens:
        line += f" | prompt {stats.prompt_tokens} tokens, {stats.cached_tokens} kept from the last turn"
    return line


def _stream_reply(lm, history: list[dict], options: dict, think: bool,  # noqa: ANN001
                  hide_think: bool) -> tuple[str, GenerationStats | None]:
    """Print the reply as it streams (reasoning dim, then a blank line, then the answer); return its text and stats."""
    out = common.stdout()
    opens_reasoning = prompt_opens_reasoning(render_prompt(lm, history, think))
    splitter = ReasoningStream(in_reasoning=opens_reasoning)
    parts, section = [], None  # section: is the text being shown reasoning (True) or answer (False)
    for chunk in stream_text(lm, history, enable_thinking=think, **options):
        parts.append(chunk.text)
        pieces = splitter.feed(chunk.text) + (splitter.flush() if chunk.finish_reason else [])
        for is_reasoning, text in pieces:
            if is_reasoning and hide_think:
                continue
            if section != is_reasoning:  # a new section starts apart, without the tags' own newlines
                text = text.lstrip()
                if not text:
                    continue
                if section is not None:
                    out.print("\n")
                section = is_reasoning
            out.print(Text(text, style="dim" if is_reasoning else ""), end="")
    out.print()
    text = "".join(parts)
    return (THINK_OPEN + text if opens_reasoning else text), chunk.stats
