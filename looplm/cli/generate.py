"""`looplm generate PROMPT`: stream a completion to stdout (or print one JSON object)."""

import json
import sys
from typing import Annotated, Optional

import typer

from looplm.cli import common
from looplm.text import THINK_OPEN, prompt_opens_reasoning, render_prompt, stream_text
from looplm.tokenizer import split_reasoning


@common.app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text; '-' reads it from stdin.", show_default=False)],
    model: common.Model = None,
    dtype: common.Dtype = "bfloat16",
    device: common.Device = "auto",
    steps: common.Steps = None,
    quant: common.Quant = None,
    group_size: common.GroupSize = None,
    max_new_tokens: common.MaxNewTokens = 128,
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
    chat: Annotated[bool, common.option("Send the prompt as one user message via the chat template", "--chat")] = False,
    system: Annotated[Optional[str], common.option("System prompt (implies --chat).", default_in_help=True)] = None,
    think: Annotated[bool, common.option("Open a <think> block in the prompt, enable_thinking (implies --chat).",
                                         "--think")] = False,
    as_json: Annotated[bool, common.option("Print one JSON object (ids, text, timings).", "--json")] = False,
) -> None:
    """Generate a completion for PROMPT and stream it to stdout; timings go to stderr."""
    if prompt == "-":
        common.read_stdin_leniently()
        prompt = sys.stdin.read()
    common.check_text(prompt, "the prompt")  # bytes that are not UTF-8 are refused, never replaced
    if system is not None:
        common.check_text(system, "--system")
    sampling = common.SamplingOptions(max_new_tokens, temperature, top_p, top_k, exit_threshold, seed, stop,
                                      presence_penalty, frequency_penalty, repetition_penalty, min_p)
    exits = common.DecodeOptions(exit_policy, kv_mode, skip_compute, decoder, draft_steps, draft_tokens,
                                 draft_confidence)
    exits.check_threshold(exit_threshold)
    common.set_threads(threads)
    lm = common.load_model(model, dtype, device, steps, quant, group_size, needs_text=True)
    chat = chat or system is not None or think
    system_message = [{"role": "system", "content": system}] if system is not None else []
    request = [*system_message, {"role": "user", "content": prompt}] if chat else prompt
    # A Thinking template opens <think> at the end of the prompt (by itself, or for --think): the
    # reply starts inside the block. Read from the prompt as rendered, not from the flag.
    opens_reasoning = chat and prompt_opens_reasoning(render_prompt(lm, request, think))
    if think and not opens_reasoning:
        common.stderr().print("warning: --think: this model's chat template does not open a <think> block "
                              "(it ignores enable_thinking); the reply is generated as usual", style="yellow")
    text = []
    for chunk in stream_text(lm, request, enable_thinking=think, **sampling.for_model(lm), **exits.as_kwargs()):
        text.append(chunk.text)
        if not as_json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    stats = chunk.stats
    if as_json:
        print(json.dumps(_json_report(lm, chunk, "".join(text), chat, opens_reasoning, exits)))
        return
    sys.stdout.write("\n")
    setup = f"{stats.decoder} decoder built in {stats.setup_s:.2f} s | " if stats.setup_s else ""
    drafts = (f"drafts accepted {stats.draft_accepted}/{stats.draft_proposed} ({stats.draft_acceptance:.0%}) | "
              if stats.draft_rounds else "")
    common.stderr().print(
        f"{setup}{stats.prompt_tokens} prompt tokens, prefill {stats.prefill_s * 1000:.1f} ms | "
        f"{stats.new_tokens} new token{'' if stats.new_tokens == 1 else 's'}, {stats.decode_tok_s:.1f} tok/s | "
        f"mean exit step {chunk.mean_exit_step or 0:.2f} | {drafts}finish: {chunk.finish_reason}",
        style="dim",
    )


def _json_report(lm, chunk, text: str, chat: bool, opens_reasoning: bool,  # noqa: ANN001
                 exits: common.DecodeOptions) -> dict:
    """`--json`'s one object: text, ids, timings and the loops used. With a chat template, a
    Thinking model's <think> text is also given apart from the answer (`opens_reasoning`: the
    prompt ended inside a <think> block, so a reply cut off before </think> is all reasoning)."""
    stats = chunk.stats
    reasoning, answer = split_reasoning((THINK_OPEN if opens_reasoning else "") + text) if chat else (None, None)
    return {
        "model": lm.source,
        "text": text,
        "reasoning": reasoning,
        "answer": answer,
        "finish_reason": chunk.finish_reason,
        "prompt_ids": chunk.prompt_ids,
        "new_ids": chunk.token_ids,
        "usage": {"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens},
        "timings": {"setup_s": stats.setup_s, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
                    "decode_tok_s": stats.decode_tok_s},
        "decoder": stats.decoder,
        "threads": _cpu_threads(),
        "speculative": {"draft_steps": exits.draft_steps, "draft_tokens": exits.draft_tokens,
                        "draft_confidence": exits.draft_confidence, "rounds": stats.draft_rounds,
                        "proposed": stats.draft_proposed, "accepted": stats.draft_accepted,
                        "acceptance": stats.draft_acceptance} if exits.draft_steps is not None else None,
        "mean_exit_step": chunk.mean_exit_step,
        "steps_per_token": stats.steps_per_token[0] if stats.steps_per_token else [],
        "mean_steps": stats.mean_steps,
        "exit_policy": exits.exit_policy or "default",
        "kv_mode": exits.kv_mode,
        "kv_bytes_per_token": common.kv_bytes(lm, exits.kv_mode),
    }


def _cpu_threads() -> int:
    import torch

    return torch.get_num_threads()
