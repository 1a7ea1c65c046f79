"""Log-likelihood of continuations for every loop count and exit policy from one pass.

One `run_steps` call at the largest step count T gives the normed state after every step
`[T, B, S, H]` (the same states `forward_steps` turns into `.logits [T, B, S, V]`). Step t of a
T-step pass is exactly the last step of a t-step pass (the stack never looks ahead), so the
log-likelihood of a t-step run is `log_softmax(lm_head(h_t))` at the scored positions; only
those positions go through `lm_head`, which saves the `[T, B, S, V]` tensor.

Exit policies are applied per scored position with `model.readout` (no-skip semantics: every
step of every token was computed, as in the reference, and the policy only chooses which step's
logits a token reads). Context tokens always run all T steps. With `skip_compute` decoding,
later tokens would see shallower K/V for tokens that exited early; that is not modelled here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from looplm.cache import KVCache
from looplm.cpu_load import adjust_threads
from looplm.errors import LooplmError
from looplm.exit import ExitPolicy
from looplm.models.ouro import OuroForCausalLM, StepOutput

# score_choices copies the context's K/V once per continuation; the copies made at once stay
# under this (a 2000-token context at the 1.4B shape is 1.5 GiB a copy: one choice at a time).
CONTEXT_COPY_BYTES = 1 << 30


@dataclass(frozen=True)
class Config:
    """One evaluated configuration: a fixed depth (`exit_policy="last"`) or a policy at `steps`."""

    steps: int
    exit_policy: str = "last"
    exit_threshold: float | None = None

    @property
    def key(self) -> str:
        return f"{self.steps}|{self.exit_policy}|{self.exit_threshold}"

    def as_dict(self) -> dict:
        return {"steps": self.steps, "exit_policy": self.exit_policy, "exit_threshold": self.exit_threshold}


@dataclass
class Scored:
    """Per configuration: the continuation's summed log-prob, whether every token was the argmax
    (lm-eval's `is_greedy`), and the sum of the steps read."""

    logprob: dict[str, float]
    greedy: dict[str, bool]
    step_sum: dict[str, float]
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str,  # noqa: ANN001
                lm_eval_whitespace: bool = False) -> tuple[list[int], list[int]]:
    """Context and continuation ids; the split is taken from the joint encoding (BPE merges across it).

    `lm_eval_whitespace` (the lm-eval adapter) follows lm-evaluation-harness's
    `TemplateLM._encode_pair`: whitespace that ends the context moves to the start of the
    continuation, so "A: " + "4" is scored as "A:" + " 4", the way BPE tokenizers write a word,
    not as a lone space token followed by "4". `looplm eval`'s own contexts end in no space, and a
    chat prompt's final newline belongs to its template, so it keeps the split as given."""
    stripped = context.rstrip()
    if lm_eval_whitespace and stripped and stripped != context:
        context, continuation = stripped, context[len(stripped):] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):  # merged across the boundary: encode apart
        return ctx, tokenizer.encode(continuation)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def score_requests(
    model: OuroForCausalLM,
    requests: list[tuple[list[int], list[int]]],
    configs: list[Config],
    policies: dict[str, ExitPolicy],
    batch_size: int,
    max_length: int | None = None,
) -> list[Scored]:
    """Score `(context_ids, continuation_ids)` pairs for every config in one pass per batch.

    `policies` maps config keys (of non-"last" configs) to built policies. Sequences are
    right-padded (causal attention: pads after a row's last token never affect it) and cut from
    the left to `max_length`.
    """
    max_steps = max(c.steps for c in configs)
    max_length = max_length or model.config.max_position_embeddings
    results: list[Scored | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    for start in range(0, len(order), batch_size):
        adjust_threads()  # follows other processes' load, when the command chose the threads
        chunk = order[start : start + batch_size]
        rows, spans = [], []
        for index in chunk:
            context, continuation = requests[index]
            assert continuation, f"request {index} has an empty continuation"
            if len(continuation) > max_length:  # no context would be left to predict its first token from
                raise LooplmError(f"a continuation of {len(continuation)} tokens is longer than the "
                                  f"{max_length}-token window it is scored in; it cannot be scored")
            sequence = (context + continuation)[-(max_length + 1):]
            rows.append(sequence[:-1])  # the input; targets are the sequence shifted by one
            spans.append((len(sequence) - 1 - len(continuation), sequence[-len(continuation):]))
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.device)
        positions = torch.arange(width, device=model.device).expand(len(rows), width)
        out = model.run_steps(ids, positions, None, steps=max_steps)
        # Gather the scored positions of every row into one flat token axis N.
        row_index = torch.cat([torch.full((len(t),), b) for b, (_, t) in enumerate(spans)]).to(model.device)
        pos_index = torch.cat([torch.arange(s, s + len(t)) for s, t in spans]).to(model.device)
        targets = torch.tensor([tok for _, t in spans for tok in t], device=model.device)
        flat = StepOutput(hidden_states=out.hidden_states[:, row_index, pos_index],  # (T, N, H)
                          gate_lambda=out.gate_lambda[:, row_index, pos_index],
                          exit_probs=out.exit_probs[:, row_index, pos_index])
        scored = _score_tokens(model, flat, targets, [len(t) for _, t in spans], configs, policies)
        for index, result in zip(chunk, scored):
            results[index] = result
    return results  # type: ignore[return-value]


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, V]` logits, `[N]` targets -> `[N]` log-probabilities (fp32) and whether each target is the argmax."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logprobs.argmax(-1) == targets


@torch.inference_mode()
def score_choices(
    model: OuroForCausalLM,
    context: list[int],
    continuations: list[list[int]],
    configs: list[Config],
    policies: dict[str, ExitPolicy],
) -> list[Scored]:
    """Like `score_requests` for continuations of one shared context, which runs only once.

    The context is prefilled into a KV cache (batch 1, every step), the cache is copied to one
    row per continuation, and the continuations run together on top of it. For multiple choice
    with long questions (MMLU) this is several times less work than scoring each pair whole.
    The copies are bounded: continuations run in groups whose copies fit `CONTEXT_COPY_BYTES`
    (at least one at a time), so a long context does not take one full copy per choice at once.
    """
    assert context and all(continuations), "context and every continuation need at least one token"
    adjust_threads()  # one question at a time: follows other processes' load between them
    max_steps = max(c.steps for c in configs)
    device, count = model.device, len(continuations)
    width = max(len(c) for c in continuations) - 1  # the last token of a continuation is never an input
    cache = model.make_cache(1, len(context) + max(width, 1), max_steps)
    ctx_positions = torch.arange(len(context), device=device).unsqueeze(0)
    prefix = model.run_steps(torch.tensor([context], device=device), ctx_positions, None, cache, max_steps)
    # The context's last state predicts every continuation's first token.
    parts = [(prefix.hidden_states[:, 0, -1:], prefix.gate_lambda[:, 0, -1:], prefix.exit_probs[:, 0, -1:])] * count
    if width > 0:
        group = max(1, CONTEXT_COPY_BYTES // (cache.keys.nbytes + cache.values.nbytes))
        for first in range(0, count, group):
            chosen = range(first, min(count, first + group))
            rest = _run_on_context(model, cache, len(context), [continuations[j] for j in chosen], width, max_steps)
            for row, j in enumerate(chosen):
                (h, g, p), used = parts[j], len(continuations[j]) - 1
                parts[j] = (torch.cat([h, rest.hidden_states[:, row, :used]], dim=1),
                            torch.cat([g, rest.gate_lambda[:, row, :used]], dim=1),
                            torch.cat([p, rest.exit_probs[:, row, :used]], dim=1))
    flat = StepOutput(hidden_states=torch.cat([h for h, _, _ in parts], dim=1),  # (T, N, H)
                      gate_lambda=torch.cat([g for _, g, _ in parts], dim=1),
                      exit_probs=torch.cat([p for _, _, p in parts], dim=1))
    targets = torch.tensor([tok for c in continuations for tok in c], device=device)
    return _score_tokens(model, flat, targets, [len(c) for c in continuations], configs, policies)


def _run_on_context(model: OuroForCausalLM, cache: KVCache, context_len: int, continuations: list[list[int]],
                    width: int, steps: int) -> StepOutput:
    """Every step's states for the continuations' input tokens (right-padded to `width`), each
    row on its own copy of the context's K/V."""
    count, device = len(continuations), model.device
    rows = type(cache).over(cache.keys.repeat(1, count, 1, 1, 1), cache.values.repeat(1, count, 1, 1, 1),
                            steps, cache.length)
    ids = torch.tensor([c[:-1] + [0] * (width + 1 - len(c)) for c in continuations], device=device)
    positions = torch.arange(context_len, context_len + width, device=device).expand(count, width)
    key_valid = torch.ones(count, context_len + width, dtype=torch.bool, device=device)
    return model.run_steps(ids, positions, key_valid, rows, steps)  # right pads: causal, never seen


def _score_tokens(
    model: OuroForCausalLM,
    flat: StepOutput,
    targets: torch.Tensor,
    lengths: list[int],
    configs: list[Config],
    policies: dict[str, ExitPolicy],
) -> list[Scored]:
    """Every config's score of `N` scored tokens: states `[T, N, H]`, gate `[T, N]`, targets `[N]`;
    `lengths` splits N into the continuations."""
    max_steps = flat.hidden_states.shape[0]
    token_lp: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (log-probs [N], is argmax [N])
    token_steps: dict[str, torch.Tensor] = {}
    needed = {c.steps for c in configs if c.exit_policy == "last"}
    step_lp = {t: _target_logprobs(model.lm_head(flat.hidden_states[t - 1]), targets) for t in sorted(needed)}
    for config in configs:
        if config.exit_policy == "last":
            token_lp[config.key] = step_lp[config.steps]
            token_steps[config.key] = torch.full_like(targets, config.steps, dtype=torch.float32)
        else:
            if config.steps != max_steps:
                raise ValueError(f"exit policies run at the largest step count {max_steps}, got {config}")
            logits, exit_step = model.readout_tokens(flat, policies[config.key])
            token_lp[config.key] = _target_logprobs(logits, targets)
            token_steps[config.key] = exit_step.float() + 1
    results, begin = [], 0
    for length in lengths:
        end = begin + length
        results.append(Scored(
            logprob={k: float(lp[begin:end].sum()) for k, (lp, _) in token_lp.items()},
            greedy={k: bool(top[begin:end].all()) for k, (_, top) in token_lp.items()},
            step_sum={k: float(v[begin:end].sum()) for k, v in token_steps.items()},
            tokens=length,
        ))
        begin = end
    return results
