"""Self-speculative decoding: draft with the first loops, verify with the rest.

A looped model's first k UT steps of a token are exactly what the full model computes for that
token's first k steps: step t reads only step t-1's state of the same token and the step-t keys
of earlier tokens. So drafting with k loops is not throw-away work. Each round:

1. **Draft** `draft_tokens` (γ) tokens one at a time, each through steps 0..k-1 only, writing
   those steps' K/V slots, and reading the next token off step k-1's logits.
2. **Verify** all γ drafted inputs in one pass over the remaining steps k..T-1, starting from
   the states the draft left (γ positions at once, causal among themselves). Every position now
   has all T steps, and the exit policy picks its logits exactly as in normal decoding.
3. **Accept** the longest prefix of drafts that the full model agrees with (greedy: the same
   argmax; sampling: the standard rejection rule, which keeps the output distribution), plus the
   full model's own token at the first disagreement. The K/V of rejected positions are dropped by
   moving the cache's length back; they are overwritten later.

A round costs γ draft passes of k loops and one pass of T-k loops over γ positions, and emits
1 to γ tokens. Memory-bound decoding reads the weights once per pass whatever the number of
positions, so a round reads them γk + (T - k) loop-times for at most γ tokens, where normal
decoding reads T per token: the speed-up is at most γT / (γk + T - k), 1.33x at T = 4, k = 2,
γ = 2, and is reached only if every draft is accepted (docs/speculative.md has measurements).

Rows of a batch share one cache length, so a round keeps the drafts that every row accepted.
The verify pass runs γ positions in one forward where normal decoding runs one, so float sums
run in another order: tokens equal normal decoding's in fp32, and in bf16 may fork at near-ties.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from looplm.decode_job import TokenJob, device_elapsed
from looplm.errors import GenerationError
from looplm.exit import ExitPolicy
from looplm.models.ouro import AttentionBias, OuroForCausalLM, StepOutput, positions_from_mask, rope_tables
from looplm.sampling import SamplingParams, check_logits, probabilities, sample


@dataclass(frozen=True)
class DraftParams:
    """`steps`: loops the draft runs (1 .. T-1); `tokens`: drafts per round (γ, at most).

    `min_confidence` > 0 ends a round's drafting early, after the first draft whose probability
    under the draft's own distribution is below it (the round then verifies what it has): a
    draft the shallow loops are unsure of is likely rejected, and every draft after a rejected
    one is wasted. The rule reads only the draft, so the output is unchanged."""

    steps: int
    tokens: int = 2
    min_confidence: float = 0.0

    def check(self, total_steps: int) -> None:
        if total_steps < 2:
            raise GenerationError(f"speculative decoding drafts with fewer loops than the model runs, and this one "
                                  f"runs {total_steps} loop; use it with 2 or more (steps=...)")
        if not isinstance(self.steps, int) or not 1 <= self.steps < total_steps:
            raise GenerationError(f"draft_steps must be an integer from 1 to {total_steps - 1} (the model runs "
                                  f"{total_steps} loops), got {self.steps!r}")
        if not isinstance(self.tokens, int) or not 1 <= self.tokens <= 64:
            raise GenerationError(f"draft_tokens must be an integer from 1 to 64, got {self.tokens!r}")
        if not isinstance(self.min_confidence, (int, float)) or not 0.0 <= self.min_confidence < 1.0:
            raise GenerationError(f"draft_confidence must be in [0, 1), got {self.min_confidence!r}")


@dataclass
class RoundResult:
    tokens: list[torch.Tensor]  # each [B]: the tokens this round emits, in order
    exit_steps: list[torch.Tensor]  # each [B]: the 0-based step the full model read them from
    proposed: int  # drafts made this round (fewer than `DraftParams.tokens` when drafting ended early)
    accepted: int  # drafts every row accepted


class SpeculativeDecoder:
    """Holds the cache and the per-row state between rounds for one batch of prompts."""

    def __init__(self, model: OuroForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int,
                 steps: int, policy: ExitPolicy, sampling: SamplingParams, generator: torch.Generator | None,
                 draft: DraftParams) -> None:
        self.model, self.steps, self.policy, self.draft = model, steps, policy, draft
        self.sampling, self.generator = sampling, generator
        device = model.device
        self.ids = ids.to(device)
        batch, prompt_len = self.ids.shape
        capacity = prompt_len + max_new_tokens + draft.tokens  # drafts may run past the last kept token
        self.cache = model.make_cache(batch, capacity, steps)
        self.prompt_positions = positions_from_mask(None if mask is None else mask.to(device), self.ids)
        # Keys that are real tokens, over the whole capacity (None: no padding anywhere).
        self.key_valid = None
        if mask is not None and not bool(mask.all()):
            self.key_valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
            self.key_valid[:, :prompt_len] = mask.to(device).bool()
        self.next_position = self.prompt_positions[:, -1] + 1  # [B]: RoPE position of the pending token

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt through every loop; the first new token and its exit step."""
        out = self.model.run_steps(self.ids, self.prompt_positions, self._valid(self.ids.shape[1]), self.cache,
                                   self.steps)
        logits, exit_step = self.model.readout(out, self.policy, position=-1)
        return sample(logits, self.sampling, self.generator), exit_step

    def round(self, pending: torch.Tensor, most: int | None = None) -> RoundResult:
        """Draft from `pending` [B] (the last emitted token, not yet in the cache), verify, accept;
        at most `most` drafts (the tokens the budget has left: a round emits no more than it drafts,
        and drafts past the budget were work and statistics for tokens never returned)."""
        model, k = self.model, self.draft.steps
        gamma = self.draft.tokens if most is None else max(1, min(self.draft.tokens, most))
        start = self.cache.length
        inputs, draft_probs, states, gates = [pending], [], [], []
        for i in range(gamma):
            h = model.model.embed_tokens(inputs[-1].unsqueeze(1))  # (B, 1, hidden)
            position = (self.next_position + i).unsqueeze(1)
            cos, sin = rope_tables(position, model.config.head_dim, model.config.rope_theta, h.dtype)
            bias = AttentionBias.build(self._valid(start + i + 1), 1, start + i, h.device)
            step_states, step_gates = model.run_loops(h, cos, sin, bias, self.cache, 0, k)
            self.cache.advance(1)
            states.append(step_states)
            gates.append(step_gates)
            draft_logits = model.lm_head(step_states[-1][:, 0])
            if self.sampling.greedy:
                token = draft_logits.argmax(-1)
                probs = torch.softmax(draft_logits.float(), dim=-1) if self.draft.min_confidence else None
            else:
                probs = probabilities(draft_logits, self.sampling)
                draft_probs.append(probs)
                token = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
            inputs.append(token)
            if probs is not None and self.draft.min_confidence:
                confidence = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)  # the draft's own probability
                if bool((confidence < self.draft.min_confidence).any()):
                    break  # a row is unsure of this draft: verify what the round has
        drafts = torch.stack(inputs[1:], dim=1)  # (B, γ'), γ' <= γ
        gamma = drafts.shape[1]

        # Verify: steps k..T-1 for the γ drafted inputs at once, from the states the draft left.
        self.cache.length = start
        h = torch.cat([s[-1] for s in states], dim=1)  # (B, γ, hidden)
        positions = self.next_position.unsqueeze(1) + torch.arange(gamma, device=h.device)
        cos, sin = rope_tables(positions, model.config.head_dim, model.config.rope_theta, h.dtype)
        bias = AttentionBias.build(self._valid(start + gamma), gamma, start, h.device)
        deep_states, deep_gates = model.run_loops(h, cos, sin, bias, self.cache, k, self.steps)
        per_step = [torch.cat([s[t] for s in states], dim=1) for t in range(k)] + deep_states
        per_gate = []  # a model without an exit gate has no lambdas
        if deep_gates:
            per_gate = [torch.cat([g[t] for g in gates], dim=1) for t in range(k)] + deep_gates
        out = StepOutput.stack(per_step, per_gate)
        targets = [model.readout(out, self.policy, position=j) for j in range(gamma)]

        tokens, accepted = accept_drafts(drafts, draft_probs, [logits for logits, _ in targets], self.sampling,
                                         self.generator)
        emitted = len(tokens)
        self.cache.length = start + emitted  # the pending token and the kept drafts; later slots are stale
        self.next_position = self.next_position + emitted
        return RoundResult(tokens, [exit_step for _, exit_step in targets[:emitted]], gamma, accepted)

    def _valid(self, end: int) -> torch.Tensor | None:
        return None if self.key_valid is None else self.key_valid[:, :end]


def accept_drafts(drafts: torch.Tensor, draft_probs: list[torch.Tensor], target_logits: list[torch.Tensor],
                  sampling: SamplingParams, generator: torch.Generator | None) -> tuple[list[torch.Tensor], int]:
    """The tokens a round emits (each `[B]`) and how many drafts every row accepted.

    `drafts` `[B, γ]`; `draft_probs[j]` the distribution draft j was sampled from (empty when
    greedy); `target_logits[j]` the full model's logits for the same position."""
    gamma = drafts.shape[1]
    check_logits(torch.stack(target_logits))  # the drafts came from the first loops: the rest may still be broken
    if sampling.greedy:
        chosen = torch.stack([logits.argmax(-1) for logits in target_logits], dim=1)  # (B, γ)
        agree = drafts == chosen
        accepted = int(agree.long().cumprod(dim=1).sum(dim=1).min())
        # Where every row agreed, the full model's token is the draft; at the first
        # disagreement it is the correction. Full acceptance emits the γ drafts.
        return [chosen[:, j] for j in range(min(accepted + 1, gamma))], accepted
    target_probs = [probabilities(logits, sampling) for logits in target_logits]
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    ratios = torch.stack([(p[rows, drafts[:, j]] / q[rows, drafts[:, j]]).clamp(max=1.0)
                          for j, (p, q) in enumerate(zip(target_probs, draft_probs))], dim=1)
    uniform = torch.rand(ratios.shape, generator=generator, device=ratios.device)
    agree = uniform < ratios  # accept draft j with probability min(1, p / q)
    accepted = int(agree.long().cumprod(dim=1).sum(dim=1).min())
    tokens = [drafts[:, j] for j in range(accepted)]
    if accepted < gamma:
        # Rows that accepted this draft keep it; the others draw from what the draft
        # under-proposed, max(0, p - q) renormalised: the rule that keeps sampling exact.
        p, q = target_probs[accepted], draft_probs[accepted]
        residual = (p - q).clamp(min=0.0)
        mass = residual.sum(dim=-1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
        corrected = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
        tokens.append(torch.where(agree[:, accepted], drafts[:, accepted], corrected))
    return tokens, accepted


def speculative_tokens(job: TokenJob, draft: DraftParams) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`decode_tokens`' contract: yield `(tokens [B], exit_steps [B])` per new position.
    Inference mode covers the model calls only, never a `yield`."""
    model, stats = job.model, job.stats
    begin = time.perf_counter()
    with torch.inference_mode():
        decoder = SpeculativeDecoder(model, job.ids, job.mask, job.max_new_tokens, job.steps, job.policy, job.sampling,
                                     job.generator, draft)
        pending, exit_step = decoder.prefill()
    stats.prefill_s = device_elapsed(begin, model.device)
    stats.new_tokens = 1
    yield pending, exit_step
    remaining = job.max_new_tokens - 1
    while remaining > 0:
        begin = time.perf_counter()
        with torch.inference_mode():
            result = decoder.round(pending, most=remaining)
        stats.decode_s += device_elapsed(begin, model.device)
        stats.draft_rounds += 1
        stats.draft_proposed += result.proposed
        stats.draft_accepted += result.accepted
        kept = list(zip(result.tokens, result.exit_steps))[:remaining]
        for token, exit_step in kept:
            stats.new_tokens += 1
            yield token, exit_step
        remaining -= len(kept)
        pending = result.tokens[-1]  # the next round drafts from the last emitted token
