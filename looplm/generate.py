"""Token-level generation: prefill, one-token decode steps, stopping, streaming.

Works on token ids. The tokenizer is touched only to detect `stop` strings.

Layers, bottom up:
- `decode_tokens` yields the next token of every row, one step at a time, from either the
  KV cache (prefill once, then one token per step) or full recomputation (`use_cache=False`,
  what the community "fixed" checkpoint does). Both read the logits of the step that the exit
  rule picks for the last position, like the reference. `decoder` picks, for the cached
  case, the dynamic decode step (every option) or the static-shape one of
  `looplm.static_decode` (CUDA graphs, `torch.compile`; full KV cache, every loop runs);
  `draft_steps` hands decoding to `looplm.speculative` (draft with k loops, verify with the rest).
- `stream_generate` adds stopping (eos ids, stop strings, budget) and yields `StepEvent`s.
- `generate` collects the new token ids of each row.
"""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from looplm.decode_job import GenerationStats, TokenJob, device_elapsed
from looplm.errors import GenerationError
from looplm.exit import ExitPolicy, check_exit_options, make_policy
from looplm.models.ouro import OuroForCausalLM, check_token_ids, positions_from_mask
from looplm.prompt_cache import PromptCache
from looplm.sampling import SamplingParams, TokenChooser, logit_bias_pairs, make_generator
from looplm.speculative import DraftParams, speculative_tokens
from looplm.static_decode import resolve_mode, static_tokens

KV_MODES = ("full", "shared")
# "dynamic": `OuroForCausalLM.decode_step`; the others are `looplm.static_decode` modes;
# "auto" is the CUDA-graph static step on a GPU where the request allows it, else dynamic.
DECODERS = ("auto", "dynamic", "eager", "compile", "graph", "compile+graph")


@dataclass
class StepEvent:
    """One decoding step: the token each still-running row produced."""

    index: int  # 0-based position among the new tokens
    tokens: dict[int, int]  # row -> token id, only rows that were running
    exit_steps: dict[int, int]  # row -> 1-based UT step whose logits were used
    finished: dict[int, str] = field(default_factory=dict)  # row -> "stop" | "length", rows that ended here


def prepare_inputs(
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accept one prompt, a list of prompts (left-padded here) or a `[B, S]` tensor (kept in its
    dtype: `check_token_ids` refuses a float tensor rather than truncate it)."""
    if isinstance(input_ids, (str, bytes)):
        raise GenerationError("input_ids must be token ids, not text: encode it first (model.tokenizer.encode)")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2):
            raise GenerationError(f"input_ids must have shape [sequence] or [batch, sequence], got "
                                  f"{list(input_ids.shape)}")
        ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    else:
        rows = _token_rows(input_ids)
        if not rows or any(len(r) == 0 for r in rows):
            raise GenerationError("every prompt needs at least one token")
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        if attention_mask is None and any(len(r) < width for r in rows):
            attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    if ids.numel() == 0 or ids.shape[1] == 0:
        raise GenerationError("the prompt is empty: give at least one token")
    if attention_mask is not None:
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if attention_mask.shape != ids.shape:
            raise GenerationError(f"attention_mask shape {list(attention_mask.shape)} != input_ids shape {list(ids.shape)}")
        mask = attention_mask.long()
        if bool((mask[:, -1] == 0).any()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise GenerationError("attention_mask must be left padding (zeros first, then ones) with a real last token")
        if bool(mask.all()):
            attention_mask = None
    return ids, attention_mask


_ROW_TYPES = (Sequence, torch.Tensor, np.ndarray)


def _token_rows(input_ids: Sequence) -> list[list[int]]:
    """One prompt (a sequence of ints) or several (a sequence of such rows) as lists of ints."""
    items = list(input_ids)
    if items and not isinstance(items[0], _ROW_TYPES):
        items = [items]
    rows = []
    for row in items:
        values = row.tolist() if isinstance(row, (torch.Tensor, np.ndarray)) else row
        if not isinstance(values, _ROW_TYPES) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in values):
            raise GenerationError("input_ids must be token ids: one list of ints, or one list of ints per prompt")
        rows.append([int(t) for t in values])
    return rows


def resolve_decoder(decoder: str, model: OuroForCausalLM, use_cache: bool, kv_mode: str, skip_compute: bool,
                    drafting: bool = False, prompt_cache: bool = False) -> str:
    """'dynamic' or the static mode to run; refuses a static mode the request cannot use.

    The static step keeps one K/V per (step, layer), runs every loop and needs a cache, so
    `auto` picks it only on CUDA with the full KV cache, without compute skipping, without
    speculative drafting (`drafting`: its rounds run their own variable-length passes) and
    without a `prompt_cache` (whose K/V live in a cache of their own)."""
    if decoder not in DECODERS:
        raise GenerationError(f"unknown decoder '{decoder}' (choose from {', '.join(DECODERS)})")
    if decoder == "auto":
        static_fits = use_cache and kv_mode == "full" and not skip_compute and not drafting and not prompt_cache
        return "graph" if static_fits and model.device.type == "cuda" else "dynamic"
    if decoder != "dynamic":
        refused = [what for what, bad in (("use_cache=False", not use_cache), (f"kv_mode='{kv_mode}'", kv_mode != "full"),
                                          ("skip_compute", skip_compute), ("draft_steps", drafting),
                                          ("a prompt_cache", prompt_cache)) if bad]
        if refused:
            raise GenerationError(f"the static decoder ('{decoder}') runs every loop with the full KV cache, so it "
                                  f"cannot take {' or '.join(refused)}; use decoder='dynamic'")
        resolve_mode(decoder, model.device)  # a graph mode needs a CUDA model
    return decoder


def decode_tokens(
    model: OuroForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    policy: ExitPolicy,
    use_cache: bool,
    steps: int,
    stats: GenerationStats,
    kv_mode: str = "full",
    skip_compute: bool = False,
    decoder: str = "dynamic",
    draft: DraftParams | None = None,
    prompt_cache: PromptCache | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(tokens [B], exit_steps [B])` for each new position; the caller feeds nothing back.

    Inference mode is switched on around each model call only, never across a `yield`, so the
    caller's own code between tokens keeps its autograd state. `stats` times model work only.
    `decoder` is 'dynamic' or a static mode already checked by `resolve_decoder`; `draft`
    (checked by `stream_generate`) decodes self-speculatively (`looplm.speculative`);
    `prompt_cache` (checked too: one row, full cache, dynamic step) keeps the K/V of the prompt
    prefix it shares with its last request, and the prompt pass runs only the rest.
    """
    stats.decoder = decoder
    job = TokenJob(model, input_ids, attention_mask, max_new_tokens, sampling, generator, policy, steps, stats)
    if draft is not None:
        yield from speculative_tokens(job, draft)
        return
    if decoder != "dynamic":
        yield from static_tokens(job, decoder)
        return
    device = model.device
    ids = input_ids.to(device)
    batch, prompt_len = ids.shape
    mask = None if attention_mask is None else attention_mask.to(device)
    positions = positions_from_mask(mask, ids)
    cache, kept = None, 0
    if prompt_cache is not None:
        cache, kept = prompt_cache.prepare(model, ids[0].tolist(), prompt_len + max_new_tokens, steps)
        stats.cached_tokens = kept
    elif use_cache:
        # Not zeroed: every position below the cache's length is written before anything reads
        # it (the prompt pass writes every prompt column, padding included; each decode step its
        # column for every row; fill_skipped the slots an early exit skipped), so a long
        # max_new_tokens costs only the pages the reply reaches.
        cache = model.make_cache(batch, prompt_len + max_new_tokens, steps, kv_mode=kv_mode, prompt_len=prompt_len,
                                 zeroed=False)
    choose = TokenChooser(sampling, generator, ids, mask)

    @torch.inference_mode()
    def forward(new_ids: torch.Tensor, new_positions: torch.Tensor, prompt: bool = False) -> tuple[torch.Tensor, ...]:
        if cache is not None and not prompt:  # one-token decode step
            logits, exit_steps = model.decode_step(new_ids, new_positions, mask, cache, steps, policy, skip_compute)
        else:  # the prompt, or full recomputation without a cache: every step runs
            out = model.run_steps(new_ids, new_positions, mask, cache, steps)
            logits, exit_steps = model.readout(out, policy, position=-1)
        return choose(logits), exit_steps

    start = time.perf_counter()
    token, exit_step = forward(ids[:, kept:], positions[:, kept:], prompt=True)
    if prompt_cache is not None:
        prompt_cache.ids.extend(ids[0, kept:].tolist())
    stats.prefill_s = device_elapsed(start, device)
    stats.new_tokens = 1
    yield token, exit_step
    for _ in range(max_new_tokens - 1):
        start = time.perf_counter()
        next_position = positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        if cache is not None:
            positions = next_position
            fed = token
            token, exit_step = forward(fed.unsqueeze(1), next_position)
            if prompt_cache is not None:  # its K/V are in the cache now
                prompt_cache.ids.append(int(fed[0]))
        else:  # recompute the whole sequence every token
            ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
            positions = torch.cat([positions, next_position], dim=1)
            token, exit_step = forward(ids, positions)
        stats.decode_s += device_elapsed(start, device)
        stats.new_tokens += 1
        yield token, exit_step


def stream_generate(
    model: OuroForCausalLM,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    exit_threshold: float | None = None,
    use_cache: bool = True,
    stop: str | Sequence[str] | None = None,
    attention_mask: torch.Tensor | None = None,
    steps: int | None = None,
    eos_token_ids: int | Sequence[int] | None = None,
    stats: GenerationStats | None = None,
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
) -> Iterator[StepEvent]:
    """Generate step by step; a row stops at an eos id, a stop string, or `max_new_tokens`.

    `decoder` (see `DECODERS`): 'dynamic' is the default decode step; 'graph' (CUDA),
    'compile', 'compile+graph' and 'eager' run the static-shape step of `looplm.static_decode`
    (same tokens; full KV cache, every loop runs); 'auto' is 'graph' on CUDA where the
    request allows it, else 'dynamic'.

    `draft_steps` (1 .. T-1) turns on self-speculative decoding (`looplm.speculative`): rounds
    of up to `draft_tokens` tokens drafted with that many loops, then verified by the remaining
    loops in one pass; `draft_confidence` > 0 ends a round's drafting at the first draft the draft
    itself gives less probability. Greedy tokens equal normal decoding's (up to float order),
    sampling keeps its distribution. It needs the full KV cache and runs every loop of every kept
    token.

    `presence_penalty`, `frequency_penalty` (each in [-2, 2]) and `logit_bias` ({token id: value
    in [-100, 100]}) change the logits before the choice, greedy or sampled, as OpenAI's API
    does; these two penalties count each row's generated tokens, not its prompt.
    `repetition_penalty` (> 0, 1 = off; HF's and vLLM's) divides the positive logits and
    multiplies the negative ones of every token the row has seen, prompt included. `min_p`
    (sampling only) drops tokens below min_p x the likeliest token's probability.

    `prompt_cache` (`looplm.prompt_cache.PromptCache`, one sequence, full KV cache, dynamic decode
    step) carries a conversation's K/V from one request to the next: the prompt pass runs only
    the tokens after the prefix the cache already holds.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_exit_options(exit_policy, exit_threshold)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, logit_bias=logit_bias_pairs(logit_bias),
                              repetition_penalty=repetition_penalty, min_p=min_p)
    sampling.check_vocab(model.config.vocab_size)
    steps = model.resolve_steps(steps)
    if kv_mode not in KV_MODES:
        raise GenerationError(f"kv_mode must be one of {', '.join(KV_MODES)}, got {kv_mode!r}")
    if not use_cache and (kv_mode != "full" or skip_compute):  # they shape the cache: ignored in silence before
        given = " and ".join(what for what, on in ((f"kv_mode='{kv_mode}'", kv_mode != "full"),
                                                   ("skip_compute", skip_compute)) if on)
        raise GenerationError(f"{given} needs the KV cache; use_cache=False recomputes every step of every position")
    draft = None
    if draft_steps is not None:
        draft = DraftParams(steps=draft_steps, tokens=draft_tokens, min_confidence=draft_confidence)
        draft.check(steps)
        refused = [what for what, bad in (("use_cache=False", not use_cache), (f"kv_mode='{kv_mode}'", kv_mode != "full"),
                                          ("skip_compute", skip_compute),
                                          ("penalties or logit_bias", sampling.adjusts_logits)) if bad]
        if refused:
            raise GenerationError(f"speculative decoding (draft_steps) verifies every loop with the full KV cache, "
                                  f"so it cannot take {' or '.join(refused)}")
    decoder = resolve_decoder(decoder, model, use_cache, kv_mode, skip_compute, drafting=draft is not None,
                              prompt_cache=prompt_cache is not None)
    policy = make_policy(
        exit_policy, exit_threshold, steps, model.config.early_exit_threshold, model.config.early_exit_step
    )
    defaults = model.generation_defaults
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos = set(model.stop_ids if eos_token_ids is None else eos_token_ids)
    pad_id = defaults.get("pad_token_id", model.config.pad_token_id) or 0
    ids, mask = prepare_inputs(input_ids, attention_mask, pad_id)
    _check_inputs(model, ids, max_new_tokens)
    ids = ids.long()
    if prompt_cache is not None:
        _check_prompt_cache(ids, mask, use_cache, kv_mode, skip_compute, draft)
    if draft is not None and ids.shape[0] > 1:
        warnings.warn(f"speculative decoding of a batch keeps, each round, only the drafts all {ids.shape[0]} rows "
                      "accepted, so it rarely pays; it is meant for one sequence at a time (docs/speculative.md)",
                      stacklevel=2)
    stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop_strings):  # "" is in every text: it stopped at once
        raise GenerationError(f"stop strings must be non-empty strings, got {stop_strings!r}")
    if stop_strings and model.tokenizer is None:
        raise GenerationError("stop strings need a tokenizer, and this model was loaded without one")
    generator = make_generator(seed, sampling.greedy, model.device)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = int(ids.shape[1])
    stats.steps_per_token = [[] for _ in range(ids.shape[0])]
    stats.kv_mode = kv_mode if use_cache else "none"
    stats.steps_available = steps
    stats.skipping = bool(skip_compute and use_cache and policy.can_skip)  # without a cache every step recomputes

    batch = ids.shape[0]
    running = set(range(batch))
    produced: list[list[int]] = [[] for _ in range(batch)]
    tokens_iter = decode_tokens(
        model, ids, mask, max_new_tokens, sampling, generator, policy, use_cache, steps, stats, kv_mode, skip_compute,
        decoder, draft, prompt_cache,
    )
    if prompt_cache is not None:
        tokens_iter = prompt_cache.hold(tokens_iter)
    for index, (tokens, exit_steps) in enumerate(tokens_iter):
        event = StepEvent(index=index, tokens={}, exit_steps={})
        for row in sorted(running):
            token = int(tokens[row])
            produced[row].append(token)
            event.tokens[row] = token
            event.exit_steps[row] = int(exit_steps[row]) + 1
            stats.steps_per_token[row].append(event.exit_steps[row])
            if token in eos or hits_stop(model, produced[row], stop_strings):
                event.finished[row] = "stop"
            elif index == max_new_tokens - 1:
                event.finished[row] = "length"
        running -= set(event.finished)
        yield event
        if not running:
            break


def generate(
    model: OuroForCausalLM,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    exit_threshold: float | None = None,
    use_cache: bool = True,
    stop: str | Sequence[str] | None = None,
    attention_mask: torch.Tensor | None = None,
    steps: int | None = None,
    eos_token_ids: int | Sequence[int] | None = None,
    exit_policy: str | None = None,
    kv_mode: str = "full",
    skip_compute: bool = False,
    return_stats: bool = False,
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
) -> list[list[int]] | tuple[list[list[int]], GenerationStats]:
    """The new token ids of each sequence, ending with the eos id or stop-string token that ended it.

    `exit_threshold` picks which UT step's logits each token reads (None: the config's
    `early_exit_threshold`, evaluated in the model dtype like the reference). `attention_mask`
    marks left padding; lists of prompts of different lengths are left-padded automatically.
    `decoder` picks the decode step and `draft_steps` (with `draft_tokens`, `draft_confidence`)
    turns on self-speculative decoding, and `presence_penalty`, `frequency_penalty`, `logit_bias`,
    `repetition_penalty` and `min_p` shape the choice, and `prompt_cache` carries a conversation's
    K/V between calls, as in `stream_generate`.
    """
    produced: dict[int, list[int]] = {}
    stats = GenerationStats()
    for event in stream_generate(
        model, input_ids, max_new_tokens, temperature, top_p, top_k, seed, exit_threshold,
        use_cache, stop, attention_mask, steps, eos_token_ids, stats, exit_policy, kv_mode, skip_compute, decoder,
        draft_steps, draft_tokens, draft_confidence, presence_penalty, frequency_penalty, logit_bias,
        repetition_penalty, min_p, prompt_cache,
    ):
        for row, token in event.tokens.items():
            produced.setdefault(row, []).append(token)
    ids = [produced[row] for row in sorted(produced)]
    return (ids, stats) if return_stats else ids


def generate_static(
    model: OuroForCausalLM,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    mode: str = "auto",
    **kwargs: object,
) -> list[list[int]] | tuple[list[list[int]], GenerationStats]:
    """`generate` through the static decode step: `decoder=mode`, where 'auto' here is
    'graph' on CUDA and 'eager' elsewhere. Takes `generate`'s other keyword arguments (a full
    KV cache, no compute skipping)."""
    return generate(model, input_ids, max_new_tokens, decoder=resolve_mode(mode, model.device), **kwargs)


def _check_prompt_cache(ids: torch.Tensor, mask: torch.Tensor | None, use_cache: bool, kv_mode: str,
                        skip_compute: bool, draft: DraftParams | None) -> None:
    """A prompt cache holds one unpadded sequence's full K/V, as the dynamic decode step writes
    them (`resolve_decoder` has refused the static ones)."""
    refused = [what for what, bad in (
        (f"a batch of {ids.shape[0]}", ids.shape[0] != 1), ("padding", mask is not None and not bool(mask.all())),
        ("use_cache=False", not use_cache), (f"kv_mode='{kv_mode}'", kv_mode != "full"),
        ("skip_compute", skip_compute), ("draft_steps", draft is not None)) if bad]
    if refused:
        raise GenerationError("a prompt_cache keeps one sequence's full K/V for the dynamic decode step, so it "
                              f"cannot take {' or '.join(refused)}")


def _check_inputs(model: OuroForCausalLM, ids: torch.Tensor, max_new_tokens: int) -> None:
    config = model.config
    check_token_ids(ids, config.vocab_size)
    total = ids.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise GenerationError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
            f"{config.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens"
        )


def hits_stop(model: OuroForCausalLM, produced: list[int], stop_strings: list[str]) -> bool:
    """Whether the text of `produced` (new token ids) now contains one of `stop_strings`."""
    if not stop_strings:
        return False
    # Only the tail can contain a newly completed stop string; decode a bounded window. Its size
    # is in bytes, not characters: a byte-level BPE may spend a token per byte (a CJK character
    # is 3 tokens there), and every token is at least one byte.
    longest = max(len(s.encode("utf-8", errors="surrogatepass")) for s in stop_strings)
    tail = model.tokenizer.decode(produced[-(longest + 8) :], skip_special_tokens=False)
    return any(s in tail for s in stop_strings)
