"""What a decoding path needs besides the model: its inputs (`TokenJob`), its counters and
timings (`GenerationStats`), and a clock that waits for the device (`device_elapsed`).

`looplm.generate` builds a `TokenJob` and hands it to one of the token sources (the dynamic
decode step in `generate`, `looplm.static_decode.static_tokens`,
`looplm.speculative.speculative_tokens`); each yields `(tokens [B], exit_steps [B])` per new
position and fills the job's stats. Living below all of them, this module lets each import it
without importing the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from looplm.exit import ExitPolicy
from looplm.models.ouro import OuroForCausalLM
from looplm.sampling import SamplingParams


@dataclass
class GenerationStats:
    """Model time only (the caller's work between tokens is not counted)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens a `PromptCache` already held, so the prompt pass skipped them
    new_tokens: int = 0
    prefill_s: float = 0.0  # the prompt pass, which also yields the first new token
    decode_s: float = 0.0  # the one-token passes that yield every later token
    steps_per_token: list[list[int]] = field(default_factory=list)  # per row: 1-based exit step of each token
    kv_mode: str = "full"
    steps_available: int = 0  # loops each token may run (the model's T or the `steps` override)
    skipping: bool = False  # decoded tokens really stop computing at their exit step
    decoder: str = "dynamic"  # the decode step that ran: "dynamic" or a static mode (`looplm.generate.DECODERS`)
    setup_s: float = 0.0  # building the static decoder (capture, compile); 0 when reused or dynamic
    # Self-speculative decoding (`draft_steps`): rounds run, drafts proposed, drafts every row kept.
    draft_rounds: int = 0
    draft_proposed: int = 0
    draft_accepted: int = 0

    @property
    def draft_acceptance(self) -> float:
        """Share of drafted tokens the full model accepted (0 without speculative decoding)."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

    @property
    def mean_steps(self) -> float:
        counts = [n for row in self.steps_per_token for n in row]
        return sum(counts) / len(counts) if counts else 0.0

    @property
    def loops_saved(self) -> int:
        """Loops the decoded tokens did not run; 0 unless skipping.

        The first new token of a row is read from the prefill, which runs every loop for every
        prompt token, so only the later (decoded) tokens can save loops.
        """
        if not self.skipping:
            return 0
        return sum(self.steps_available - n for row in self.steps_per_token for n in row[1:])

    @property
    def loops_possible(self) -> int:
        """Loops the decoded tokens would have run at full depth (the base of `loops_saved`)."""
        return sum(self.steps_available * len(row[1:]) for row in self.steps_per_token)

    @property
    def decode_tok_s(self) -> float:
        decoded = self.new_tokens - 1  # the first token came from the prefill
        return decoded / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0


@dataclass
class TokenJob:
    """One batch's decoding inputs, as `decode_tokens` hands them to the static and speculative
    paths (each yields `(tokens [B], exit_steps [B])` per new position and fills `stats`)."""

    model: OuroForCausalLM
    ids: torch.Tensor
    mask: torch.Tensor | None
    max_new_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None
    policy: ExitPolicy
    steps: int
    stats: GenerationStats


def device_elapsed(start: float, device: torch.device) -> float:
    """Seconds since `start`, after the device has finished: GPU work is asynchronous, so
    without a sync the clock would stop when the kernels were queued, not when they ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
