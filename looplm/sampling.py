"""Next-token choice from logits: bias and penalties, then greedy, or temperature, min-p, top-k, top-p.

`sample` and `probabilities` are pure tensor functions. `TokenChooser` adds what depends on
the tokens seen so far: the repetition penalty (prompt and output, as HF and vLLM count it) and
OpenAI's presence and frequency penalties (output only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from looplm.config import is_finite_number
from looplm.errors import GenerationError

MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # and for each logit_bias value: [-100, 100]
# Logits no token can be chosen from: NaN, +inf, or a row of only -inf. A -inf logit alone is a
# token ruled out, and is allowed.
BAD_LOGITS = "the model's logits are NaN or infinite at this step: its weights may be corrupt"
# Temperatures below this are greedy (as in vLLM): dividing fp32 logits by 1e-38 overflows, and by
# 5e-324 (0 in fp32) is a division by zero.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    # Subtracted from a token's logit once it has been generated (presence) and per time (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, value) pairs added to the logits before anything else; see `logit_bias_pairs`.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # HF's and vLLM's: a seen token's logit is divided by this when positive, multiplied when negative.
    repetition_penalty: float = 1.0
    # Sampling keeps only tokens with at least min_p x the likeliest token's probability (0: off).
    min_p: float = 0.0

    def __post_init__(self) -> None:
        # Every value must be finite: NaN passes `<` checks and then breaks the sampler mid-request.
        if not is_finite_number(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_finite_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_finite_number(value) or not abs(value) <= MAX_PENALTY:
                raise GenerationError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        for token, value in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or not is_finite_number(value) \
                    or not abs(value) <= MAX_LOGIT_BIAS:
                raise GenerationError(f"logit_bias needs token ids >= 0 and values in [-{MAX_LOGIT_BIAS:g}, "
                                      f"{MAX_LOGIT_BIAS:g}], got {token!r}: {value!r}")
        if not is_finite_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                                  f"got {self.repetition_penalty!r}")
        if not is_finite_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """True when penalties or a bias change the logits before the choice."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1)

    def check_vocab(self, vocab_size: int) -> None:
        """A GenerationError when a logit_bias id is outside the model's vocabulary."""
        outside = [token for token, _ in self.logit_bias if token >= vocab_size]
        if outside:
            raise GenerationError(f"logit_bias token id {outside[0]} is outside the vocabulary (0..{vocab_size - 1})")


def logit_bias_pairs(bias: Mapping[int | str, float] | None) -> tuple[tuple[int, float], ...]:
    """`{token id: value}` (ids may be strings, as in JSON) as sorted pairs for `SamplingParams`."""
    if bias is not None and not isinstance(bias, Mapping):
        raise GenerationError(f"logit_bias must map token ids to values, got {type(bias).__name__}")
    pairs = {}
    for key, value in (bias or {}).items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit())):
            raise GenerationError(f"logit_bias keys must be token ids, got {key!r}")
        pairs[int(key)] = value
    return tuple(sorted(pairs.items()))  # SamplingParams checks the values


def make_generator(seed: int | None, greedy: bool, device: torch.device) -> torch.Generator | None:
    """The random generator a request samples with: seeded with `seed` (which must fit torch's
    64 bits), else freshly seeded from the OS when sampling, else None (greedy needs none)."""
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise GenerationError(f"seed must be an integer, got {seed!r}")
        if not -(2**63) <= seed < 2**64:
            raise GenerationError(f"seed must fit in 64 bits, got {seed}")
        if torch.device(device).type == "cpu":
            seed = _fold_to_32_bits(seed)
        return torch.Generator(device=device).manual_seed(seed)
    if greedy:
        return None
    generator = torch.Generator(device=device)
    generator.seed()
    return generator


def _fold_to_32_bits(seed: int) -> int:
    """torch's CPU generator (mt19937) keeps only a seed's low 32 bits, so seeds 1 and 1 + 2**32
    drew the same tokens. Seeds in [0, 2**32) are kept; any other goes through splitmix64's
    mixer first, so every one of its 64 bits changes the draw."""
    seed %= 2**64  # a negative seed as torch reads it
    if seed < 2**32:
        return seed
    mask = 2**64 - 1
    seed = (seed + 0x9E3779B97F4A7C15) & mask
    seed = ((seed ^ (seed >> 30)) * 0xBF58476D1CE4E5B9) & mask
    seed = ((seed ^ (seed >> 27)) * 0x94D049BB133111EB) & mask
    return (seed ^ (seed >> 31)) & 0xFFFFFFFF


def adjust_logits(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None,
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, V]` logits, in fp32, after (in vLLM's order) the bias, the repetition penalty over the
    `seen` tokens ([B, V] bool: prompt and output), then OpenAI's penalties over the generated
    `counts` ([B, V]): logit - count x frequency_penalty - (count > 0) x presence_penalty. The
    logits themselves when there is nothing to adjust."""
    if not params.adjusts_logits:
        return logits
    scores = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([token for token, _ in params.logit_bias], device=scores.device)
        scores[:, ids] += torch.tensor([value for _, value in params.logit_bias], device=scores.device)
    if seen is not None and params.repetition_penalty != 1:
        penalised = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if counts is not None and (params.presence_penalty or params.frequency_penalty):
        scores -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    return scores


class TokenChooser:
    """Chooses each next token of a batch (`adjust_logits`, then `sample`) and keeps what the
    penalties need: per row, the tokens seen (the prompt's real tokens, then each choice) and
    the times each token was chosen."""

    def __init__(self, params: SamplingParams, generator: torch.Generator | None = None,
                 prompt: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> None:
        """`prompt` [B, S] (with `prompt_mask` [B, S] marking real tokens under left padding)
        seeds the tokens the repetition penalty counts as seen."""
        self.params, self.generator = params, generator
        self.prompt, self.prompt_mask = prompt, prompt_mask
        self.counts: torch.Tensor | None = None  # [B, V] fp32, made at the first call that needs it
        self.seen: torch.Tensor | None = None  # [B, V] bool, likewise

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """`[B, V]` logits -> `[B]` token ids; a GenerationError when the model's logits are broken."""
        params = self.params
        check_logits(logits)  # the model's own: a huge repetition penalty may make adjusted ones infinite
        if not params.adjusts_logits:
            return _choose(logits, params, self.generator)
        if params.repetition_penalty != 1 and self.seen is None:
            self.seen = self._prompt_tokens(logits)
        tokens = _choose(adjust_logits(logits, params, self.counts, self.seen), params, self.generator)
        if params.presence_penalty or params.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
            self.counts.scatter_add_(1, tokens.unsqueeze(1), torch.ones_like(tokens, dtype=torch.float32).unsqueeze(1))
        if self.seen is not None:
            self.seen.scatter_(1, tokens.unsqueeze(1), True)
        return tokens

    def _prompt_tokens(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, V] bool: the tokens of each row's prompt, padding left out."""
        hits = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
        if self.prompt is not None:
            prompt = self.prompt.to(logits.device).long()
            real = torch.ones_like(prompt, dtype=torch.int32) if self.prompt_mask is None \
                else self.prompt_mask.to(logits.device).int()
            hits.scatter_add_(1, prompt, real)  # adds, so a pad id that is also a real token still counts
        return hits > 0


def usable_rows(logits: torch.Tensor) -> torch.Tensor:
    """`[B, V]` logits -> `[B]` bool: the rows a token can be chosen from (see BAD_LOGITS). One
    reduction: a row's max is NaN if any logit is, +inf if any is, -inf if all are."""
    return torch.isfinite(logits.amax(dim=-1))


def check_logits(logits: torch.Tensor) -> None:
    """A GenerationError (BAD_LOGITS) unless every row of `[..., V]` logits is usable: greedy
    would otherwise pick an arbitrary token from NaN, and sampling fail in torch.multinomial."""
    if not bool(usable_rows(logits).all()):
        raise GenerationError(BAD_LOGITS)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """`[B, V]` logits -> `[B]` token ids; a GenerationError when a row's logits are NaN or infinite."""
    check_logits(logits)
    return _choose(logits, params, generator)


def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The fp32 distribution `[B, V]` that `sample` draws from (temperature, then min-p, top-k and
    top-p); speculative decoding compares two of them. Not for greedy params.

    The logits are shifted so the largest is 0 before the temperature divides them, and an
    infinite logit (a huge repetition penalty's division) is clamped to the fp32 range first,
    so extreme but valid settings give a distribution, never NaN."""
    finite = torch.finfo(torch.float32).max
    scores = logits.float().clamp(-finite, finite)
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        keep = probs >= params.min_p * probs.max(dim=-1, keepdim=True).values
        scores = scores.masked_fill(~keep, float("-inf"))
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = _top_p_filter(scores, params.top_p)
    return torch.softmax(scores, dim=-1)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top one)."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token
    drop_sorted[..., 0] = False  # a top_p that rounds to 0 in fp32 still keeps the likeliest token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
