"""Self-speculative decoding: draft with the first loops, verify with the rest.

A looped model's first k UT steps of a token are exactly what the full model computes for that
token's first k steps: step t reads only step t-1's state of the same token and the step-t keys
of earlier tokens. So drafting with k loops is not throw-away work. Each round:

1. **Draft** `draft_tokens` (γ) tokens one at a time, each through steps 0..k-1 only, writing
   those steps' K/V slots, and reading the next token off step k-1's logits.
2. **Verify** all γ drafted inputs in one pass over the remaining steps k..T-1, starting from
   the states the draft left (γ positions at once, causal among themselves). Every position now
   has all T steps, and the exit policy picks its logits exactly as in normal decoding.
3. **Accept**, per row, the longest prefix of drafts that the full model agrees with (greedy:
   the same argmax; sampling: the standard rejection rule, which keeps the output distribution),
   plus the full model's own token at the first disagreement. The K/V of rejected positions are
   dropped: the cache's length moves back to the end of the longest row's kept positions, and a
   row that kept fewer masks its rejected slots out of attention for good (a hole, like left
   padding); slots past the length are overwritten later.

A round costs γ draft passes of k loops and one pass of T-k loops over γ positions, and emits
1 to γ tokens. Memory-bound decoding reads the weights once per pass whatever the number of
positions, so a round reads them γk + (T - k) loop-times for at most γ tokens, where normal
decoding reads T per token: the speed-up is at most γT / (γk + T - k), 1.33x at T = 4, k = 2,
γ = 2, and is reached only if every draft is accepted (docs/speculative.md has measurements).

Each row of a batch keeps its own accepted drafts, so a row's tokens and rounds are the ones it
would get alone; the batch runs rounds until its slowest row has its tokens (faster rows run
ahead and wait), and a batch's cache reserves up to γ slots per new token for the holes. The
verify pass runs γ positions in one forward where normal decoding runs one, so float sums run in
another order: tokens equal normal decoding's in fp32, and in bf16 may fork at near-ties.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from looplm.decode_job import TokenJob, device_elapsed
from looplm.errors import GenerationError
from looplm.exit import ExitPolicy
from looplm.models.ouro import AttentionBias, OuroForCausalLM, StepOutput, positions_from_mask, rope_tables
from looplm.sampling import SamplingParams, probabilities, sample


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
class Acceptance:
    """What a round keeps, per row: row r emits `tokens[r, :emitted[r]]`, of which the first
    `accepted[r]` are its drafts (the rest, if any, is the full model's correction)."""

    tokens: torch.Tensor  # [B, γ]
    emitted: torch.Tensor  # [B], 1 .. γ
    accepted: torch.Tensor  # [B], 0 .. γ


@dataclass
class RoundResult:
    tokens: torch.Tensor  # [B, γ]: row r emits tokens[r, :emitted[r]], in order
    exit_steps: torch.Tensor  # [B, γ]: the 0-based step the full model read each from
    emitted: torch.Tensor  # [B]
    proposed: int  # drafts made this round, all rows together
    accepted: int  # drafts the rows kept, all rows together


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
        # Drafts may run past the last kept token. In a batch every round may also leave holes
        # (slots a row rejected while another row kept them), at most γ slots per round and one
        # round per new token of the slowest row.
        rounds_slots = max_new_tokens if batch == 1 else draft.tokens * max_new_tokens
        capacity = prompt_len + rounds_slots + draft.tokens
        self.cache = model.make_cache(batch, capacity, steps)
        self.prompt_positions = positions_from_mask(None if mask is None else mask.to(device), self.ids)
        # Keys that are real tokens, over the whole capacity (None: one row and no padding: no holes).
        self.key_valid = None
        if batch > 1 or (mask is not None and not bool(mask.all())):
            self.key_valid = torch.ones(batch, capacity, dtype=torch.bool, device=device)
            if mask is not None:
                self.key_valid[:, :prompt_len] = mask.to(device).bool()
        self.next_position = self.prompt_positions[:, -1] + 1  # [B]: RoPE position of the pending token

    def prefill(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt through every loop; the first new token and its exit step."""
        out = self.model.run_steps(self.ids, self.prompt_positions, self._valid(self.ids.shape[1]), self.cache,
                                   self.steps)
        logits, exit_step = self.model.readout(out, self.policy, position=-1)
        return sample(logits, self.sampling, self.generator), exit_step

    def round(self, pending: torch.Tensor) -> RoundResult:
        """Draft from `pending` [B] (the last emitted token, not yet in the cache), verify, accept."""
        model, k, gamma = self.model, self.draft.steps, self.draft.tokens
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

        kept = accept_drafts(drafts, draft_probs, [logits for logits, _ in targets], self.sampling, self.generator)
        longest = int(kept.emitted.max())
        if self.key_valid is not None:  # a row's slots past what it kept are holes from now on
            kept_slot = torch.arange(longest, device=kept.emitted.device) < kept.emitted.unsqueeze(1)
            self.key_valid[:, start : start + longest] &= kept_slot
        self.cache.length = start + longest  # later slots are stale and get overwritten
        self.next_position = self.next_position + kept.emitted
        exit_steps = torch.stack([exit_step for _, exit_step in targets], dim=1)
        return RoundResult(kept.tokens, exit_steps, kept.emitted, gamma * drafts.shape[0], int(kept.accepted.sum()))

    def _valid(self, end: int) -> torch.Tensor | None:
        return None if self.key_valid is None else self.key_valid[:, :end]


def accept_drafts(drafts: torch.Tensor, draft_probs: list[torch.Tensor], target_logits: list[torch.Tensor],
                  sampling: SamplingParams, generator: torch.Generator | None) -> Acceptance:
    """What each row keeps of its drafts `[B, γ]`: the prefix the full model accepts, then the
    full model's token at the first rejection (none after a fully accepted prefix).

    `draft_probs[j]` is the distribution draft j was sampled from (empty when greedy);
    `target_logits[j]` the full model's logits for the same position."""
    gamma = drafts.shape[1]
    if sampling.greedy:
        chosen = torch.stack([logits.argmax(-1) for logits in target_logits], dim=1)  # (B, γ)
        accepted = (drafts == chosen).long().cumprod(dim=1).sum(dim=1)
        # The full model's tokens are the drafts up to the first disagreement, then its correction.
        return Acceptance(chosen, (accepted + 1).clamp(max=gamma), accepted)
    target_probs = torch.stack([probabilities(logits, sampling) for logits in target_logits], dim=1)  # (B, γ, V)
    proposal_probs = torch.stack(draft_probs, dim=1)
    chosen_p = target_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    chosen_q = proposal_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    uniform = torch.rand(drafts.shape, generator=generator, device=drafts.device)
    agree = uniform < (chosen_p / chosen_q).clamp(max=1.0)  # accept draft j with probability min(1, p / q)
    accepted = agree.long().cumprod(dim=1).sum(dim=1)
    # A row that rejected draft j draws its token there from what the draft under-proposed,
    # max(0, p - q) renormalised: the rule that keeps sampling exact.
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    first_rejected = accepted.clamp(max=gamma - 1)
    p, q = target_probs[rows, first_rejected], proposal_probs[rows, first_rejected]
    residual = (p - q).clamp(min=0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
    corrected = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
    tokens = drafts.clone()
    rejected = accepted < gamma
    tokens[rows[rejected], first_rejected[rejected]] = corrected[rejected]
    return Acceptance(tokens, (accepted + 1).clamp(max=gamma), accepted)


def speculative_tokens(job: TokenJob, draft: DraftParams) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`decode_tokens`' contract: yield `(tokens [B], exit_steps [B])` per new position.

    Rows keep different numbers of tokens per round, so each row queues what it kept; a
    position is yielded once every row has a token for it, and a round runs when some row's
    queue is empty. Inference mode covers the model calls only, never a `yield`."""
    model, stats = job.model, job.stats
    begin = time.perf_counter()
    with torch.inference_mode():
        decoder = SpeculativeDecoder(model, job.ids, job.mask, job.max_new_tokens, job.steps, job.policy, job.sampling,
                                     job.generator, draft)
        pending, exit_step = decoder.prefill()
    stats.prefill_s = device_elapsed(begin, model.device)
    stats.new_tokens = 1
    yield pending, exit_step
    queued_tokens: list[deque[torch.Tensor]] = [deque() for _ in range(pending.shape[0])]
    queued_steps: list[deque[torch.Tensor]] = [deque() for _ in range(pending.shape[0])]
    for _ in range(job.max_new_tokens - 1):
        if not all(queued_tokens):
            begin = time.perf_counter()
            with torch.inference_mode():
                result = decoder.round(pending)
            stats.decode_s += device_elapsed(begin, model.device)
            stats.draft_rounds += 1
            stats.draft_proposed += result.proposed
            stats.draft_accepted += result.accepted
            for row, count in enumerate(result.emitted.tolist()):
                queued_tokens[row].extend(result.tokens[row, :count])
                queued_steps[row].extend(result.exit_steps[row, :count])
            # Each row drafts on from the last token it kept.
            pending = result.tokens.gather(1, (result.emitted - 1).unsqueeze(1)).squeeze(1)
        stats.new_tokens += 1
        yield torch.stack([q.popleft() for q in queued_tokens]), torch.stack([q.popleft() for q in queued_steps])
