"""The Ouro looped transformer (and plain Llama, as the one-loop special case).

Ouro is a Qwen2-style decoder whose whole layer stack runs `total_ut_steps` (T) times per
token with shared weights. After every pass the final norm is applied; that normed state
feeds the next pass, gives the step's logits through `lm_head`, and is read by the scalar
exit gate. Layers use sandwich norms (a norm before and after attention and MLP).

Numerics mirror the reference op for op (RMSNorm reduces in fp32 and casts back before the
weight multiply; RoPE angles in fp32, cos/sin cast to the activation dtype; SDPA attention;
exit pdf in the gate's dtype), so fp32 and bf16 outputs match it.

A Llama checkpoint (e.g. from GGUF) runs through the same code with T = 1, no `_2` norms
and no gate.

This file knows nothing about sampling, tokenizers or files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from looplm.cache import KVCache, Segments, SharedKVCache
from looplm.config import OuroConfig
from looplm.errors import GenerationError
from looplm.exit import ExitPolicy, StepView, exit_distribution, gather_steps, mix_steps, select_exit_steps


class RMSNorm(nn.Module):
    # Set per module by `looplm.kernels.use_cpu_kernels`: a fused bf16 CPU kernel with these
    # numerics, called as kernel(x, weight, eps) (one call instead of eight tensor ops).
    kernel = None

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and _inference_bf16_cpu(x, self.weight):
            return self.kernel(x, self.weight, self.eps)
        dtype = x.dtype
        y = x.to(torch.float32)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast before the weight product, as the reference does (bit parity in bf16).
        return self.weight * y.to(dtype)


def _inference_bf16_cpu(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether looplm's bf16 CPU inference kernels may replace eager ops for `x` (no autograd)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    dtypes_ok = x.dtype == torch.bfloat16 and (weight is None or weight.dtype == torch.bfloat16)
    return dtypes_ok and x.is_cpu and not needs_grad


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, S, D]` for int positions `[B, S]`: angles in fp32, then cast."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (B, S, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, S, D): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, H, S, D]`, cos/sin `[B, S, D]`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


@dataclass
class AttentionBias:
    """What SDPA needs: an explicit boolean mask `[B, 1, S_q, S_kv]` (True = attend) or none."""

    mask: torch.Tensor | None
    is_causal: bool

    @classmethod
    def build(
        cls, key_valid: torch.Tensor | None, query_len: int, past_len: int, device: torch.device | None = None
    ) -> AttentionBias:
        """`key_valid` `[B, past + S_q]` marks real (non-pad) tokens; None means no padding."""
        no_padding = key_valid is None or bool(key_valid.all())
        if no_padding and past_len == 0:
            return cls(None, is_causal=query_len > 1)
        if no_padding and query_len == 1:
            return cls(None, is_causal=False)
        total = past_len + query_len
        device = key_valid.device if key_valid is not None else device
        query_pos = torch.arange(past_len, total, device=device).unsqueeze(1)
        key_pos = torch.arange(total, device=device).unsqueeze(0)
        allowed = (key_pos <= query_pos).unsqueeze(0)  # (1, S_q, S_kv)
        if key_valid is not None:
            allowed = allowed & key_valid.bool().unsqueeze(1)
        # A pad query would see no key at all (NaN softmax); let it see itself. Its output is unused.
        allowed = allowed | (key_pos == query_pos).unsqueeze(0)
        return cls(allowed.unsqueeze(1), is_causal=False)

    def select(self, rows: torch.Tensor | None) -> AttentionBias:
        if rows is None or self.mask is None:
            return self
        return AttentionBias(self.mask[rows], self.is_causal)


def segmented_attention(q: torch.Tensor, segments: Segments, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention over keys split into segments (the shared-KV cache), one softmax over all.

    q `[B, H, S, D]`; each segment `[B, H_kv, S_i, D]`; mask `[B, 1, S, sum S_i]` or None.
    Softmax runs in fp32; no segment is copied or concatenated.
    """
    batch, heads, seq, dim = q.shape
    kv_heads = segments[0][0].shape[1]
    groups = heads // kv_heads
    q = q.reshape(batch, kv_heads, groups * seq, dim)  # query head h = kv_head * groups + g
    scores = torch.cat([q @ k.transpose(-1, -2) for k, _ in segments], dim=-1).float() * dim**-0.5
    if mask is not None:
        mask = mask.unsqueeze(2).expand(batch, 1, groups, seq, mask.shape[-1]).reshape(batch, 1, groups * seq, -1)
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    out, begin = None, 0
    for k, v in segments:
        part = weights[..., begin : begin + k.shape[2]] @ v
        out = part if out is None else out + part
        begin += k.shape[2]
    return out.reshape(batch, heads, seq, dim)


class Attention(nn.Module):
    # Set by `looplm.kernels.use_cpu_kernels`: a single-query attention kernel for bf16
    # decode, called as kernel(q, keys, values, mask) with the cache's segments.
    decode_kernel = None
    rope_kernel = None  # set per module by `looplm.kernels.use_cpu_kernels`: fused bf16 RoPE, same rounding
    # Set per module by `looplm.kernels.use_cpu_kernels`: q/k/v run together (x -> [q, k, v],
    # or None where it does not apply); see looplm.kernels.shared_input.
    qkv_group = None

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: AttentionBias,
        cache: KVCache | None,
        slot: int,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        projected = self.qkv_group(x) if self.qkv_group is not None else None
        q, k, v = projected if projected is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        return self.attend(q, k, v, cos, sin, bias, cache, slot, rows)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: AttentionBias,
        cache: KVCache | None,
        slot: int,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Everything after the q/k/v projections `[B, S, H*D]`: RoPE, the cache, attention, o_proj.

        A cache with an `attention` attribute (the static decoder's slots) computes the
        attention itself, as `attention(q, keys, values, bias)` over its single segment."""
        batch, seq, _ = q.shape
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_kernel is not None and _inference_bf16_cpu(q) and not k.requires_grad:
            q, k = self.rope_kernel(q, cos, sin), self.rope_kernel(k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            segments = cache.update(slot, cache.length, k, v, rows)  # [(B, Hkv, S_i, D), ...]
            if self.decode_kernel is not None and seq == 1 and q.dtype == torch.bfloat16 and not torch.is_grad_enabled():
                return self._merge_heads(self.decode_kernel(q, [k for k, _ in segments], [v for _, v in segments],
                                                            bias.mask))
            if len(segments) > 1:
                return self._merge_heads(segmented_attention(q, segments, bias.mask))
            k, v = segments[0]  # (B, Hkv, past + S, D)
            own_attention = getattr(cache, "attention", None)
            if own_attention is not None:
                return self._merge_heads(own_attention(q, k, v, bias))
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return self._merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias.mask, is_causal=bias.is_causal))

    def _merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head outputs `[B, H, S, D]` -> `[B, S, H*D]` -> o_proj."""
        batch, _, seq, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nn.Module):
    gate_up_group = None  # like Attention.qkv_group: x -> [gate, up] or None

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.gate_up_group(x) if self.gate_up_group is not None else None
        gate, up = projected if projected is not None else (self.gate_proj(x), self.up_proj(x))
        return self.combine(gate, up)

    def combine(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Everything after the gate and up projections."""
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Sandwich-norm layer. Naming trap kept from the checkpoint: `post_attention_layernorm`
    is the pre-MLP norm, and the `_2` norms wrap the sublayer outputs before the residual add."""

    # Set per layer by `looplm.kernels.use_cpu_kernels`: the one-token decode pass as direct
    # kernel calls (looplm.kernels.decode_layer), or None; it returns None where it does not apply.
    decode_plan = None

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        if config.sandwich_norm:
            self.input_layernorm_2 = RMSNorm(config.hidden_size, eps)
            self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, eps)
        else:
            self.input_layernorm_2 = nn.Identity()
            self.post_attention_layernorm_2 = nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: AttentionBias,
        cache: KVCache | None,
        slot: int,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.decode_plan is not None:
            out = self.decode_plan(x, cos, sin, bias, cache, slot, rows)
            if out is not None:
                return out
        attn = self.self_attn(self.input_layernorm(x), cos, sin, bias, cache, slot, rows)
        x = x + self.input_layernorm_2(attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + self.post_attention_layernorm_2(mlp)


def _embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """nn.Embedding with torch's N(0, 1) init, skipped on the meta device where loaders build models.

    The first call of `nn.init.normal_` imports torch._dynamo (about a second), and a model built
    on the meta device has no values to initialise: loading the embedded model took 1.5 s, 0.6 s
    without it."""
    weight = torch.empty(vocab_size, hidden_size)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding.from_pretrained(weight, freeze=False)


class OuroModel(nn.Module):
    """Embedding, the shared layer stack, the final norm and the exit gate."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1) if config.has_exit_gate else None


@dataclass
class StepOutput:
    """Per-step results of one forward pass over `steps` UT steps."""

    hidden_states: torch.Tensor  # (T, B, S, hidden): normed state after each step
    gate_lambda: torch.Tensor  # (T, B, S): sigmoid of the gate, in the model dtype
    exit_probs: torch.Tensor  # (T, B, S): exit pdf, sums to 1 over T
    logits: torch.Tensor | None = None  # (T, B, S, vocab) when requested

    @classmethod
    def stack(cls, states: Sequence[torch.Tensor], gates: Sequence[torch.Tensor]) -> StepOutput:
        """From per-step states `[B, S, hidden]` and gate lambdas `[B, S]` (none: a model without
        a gate, whose tokens all exit at the last step)."""
        hidden = torch.stack(list(states))
        if gates:
            gate_lambda = torch.stack(list(gates))
            return cls(hidden_states=hidden, gate_lambda=gate_lambda, exit_probs=exit_distribution(gate_lambda))
        gate_lambda = torch.ones(hidden.shape[:-1], dtype=hidden.dtype, device=hidden.device)
        exit_probs = torch.zeros_like(gate_lambda)
        exit_probs[-1] = 1.0
        return cls(hidden_states=hidden, gate_lambda=gate_lambda, exit_probs=exit_probs)


@dataclass
class CausalLMOutput:
    """What calling the model returns (`model(input_ids, ...)`), as the reference's forward does."""

    logits: torch.Tensor  # (B, S, vocab): the logits each token reads
    loss: torch.Tensor | None = None  # with labels: mean shifted cross-entropy, fp32
    exit_steps: torch.Tensor | None = None  # (B, S): the 0-based step each token read; None for a mixture


class OuroForCausalLM(nn.Module):
    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OuroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Filled in by `looplm.load`; the model itself never reads them.
        self.tokenizer = None
        self.generation_defaults: dict = {}
        self.source: str = ""

    @property
    def stop_ids(self) -> frozenset[int]:
        """The eos ids generation stops at by default: generation_config.json's (as `looplm.load`
        read them), else config.json's."""
        return frozenset(self.generation_defaults.get("eos_token_ids", self.config.eos_token_ids))

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def make_cache(
        self,
        batch_size: int,
        max_len: int,
        steps: int | None = None,
        kv_mode: str = "full",
        prompt_len: int | None = None,
        zeroed: bool = True,
    ) -> KVCache:
        """A cache for `max_len` tokens; `kv_mode="shared"` needs the prompt length. `zeroed=False`
        leaves the buffers' contents undefined, for callers that never read a position before
        writing it (see `looplm.cache`)."""
        steps = steps or self.config.total_ut_steps
        shape = dict(
            num_steps=steps,
            num_layers=self.config.num_hidden_layers,
            batch_size=batch_size,
            num_kv_heads=self.config.num_key_value_heads,
            head_dim=self.config.head_dim,
            dtype=self.dtype,
            device=self.device,
            zeroed=zeroed,
        )
        if kv_mode == "full":
            return KVCache(max_len=max_len, **shape)
        if kv_mode == "shared":
            if prompt_len is None or not 0 < prompt_len <= max_len:
                raise ValueError(f"kv_mode='shared' needs 0 < prompt_len <= max_len, got {prompt_len}")
            return SharedKVCache(prompt_len=prompt_len, max_new=max_len - prompt_len, **shape)
        raise ValueError(f"unknown kv_mode '{kv_mode}' (choose full or shared)")

    def run_steps(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        cache: KVCache | None = None,
        steps: int | None = None,
    ) -> StepOutput:
        """Run the stack `steps` times over `input_ids` `[B, S]`.

        `key_valid` `[B, past + S]` marks real tokens (None: no padding). With a cache, the new
        tokens' K/V go to slot `step * L + layer` after the `cache.length` tokens already there.
        """
        steps = steps or self.config.total_ut_steps
        past = cache.length if cache is not None else 0
        bias = AttentionBias.build(key_valid, input_ids.shape[1], past, input_ids.device)
        h = self.model.embed_tokens(input_ids)  # (B, S, hidden)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        states, gates = self.run_loops(h, cos, sin, bias, cache, 0, steps)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return StepOutput.stack(states, gates)

    def run_loops(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: AttentionBias,
        cache: KVCache | None,
        first_step: int,
        end_step: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """UT steps `first_step .. end_step - 1` from the state `h` `[B, S, hidden]` (the embedding
        for step 0, else the normed state of step `first_step - 1`). K/V go to those steps' slots at
        `cache.length`; the caller advances the cache. Returns each step's normed state and, when
        the model has an exit gate, its lambdas `[B, S]` (else an empty list)."""
        num_layers = self.config.num_hidden_layers
        states, gates = [], []
        for step in range(first_step, end_step):
            for index, layer in enumerate(self.model.layers):
                h = layer(h, cos, sin, bias, cache, slot=step * num_layers + index)
            h = self.model.norm(h)  # the normed state feeds the next step, the gate and lm_head
            states.append(h)
            if self.model.early_exit_gate is not None:
                gates.append(torch.sigmoid(self.model.early_exit_gate(h).squeeze(-1)))
        return states, gates

    def forward_steps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        steps: int | None = None,
        with_logits: bool = True,
    ) -> StepOutput:
        """All per-step logits `[T, B, S, vocab]` (unless `with_logits` is False) and the exit pdf
        `[T, B, S]`, without a cache. Sequences longer than the context are refused, as in
        `generate` (RoPE past `max_position_embeddings` is outside what the model was trained on)."""
        check_token_ids(input_ids, self.config.vocab_size)
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise GenerationError(f"input of {input_ids.shape[1]} tokens exceeds the context of "
                                  f"{self.config.max_position_embeddings} tokens")
        steps = self.resolve_steps(steps)
        positions = positions_from_mask(attention_mask, input_ids)
        key_valid = None if attention_mask is None else attention_mask.bool()
        out = self.run_steps(input_ids, positions, key_valid, steps=steps)
        if with_logits:
            out.logits = self.lm_head(out.hidden_states)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        exit_threshold: float | None = None,
        exit_at_step: int | None = None,
        use_weighted_exit: bool = False,
        steps: int | None = None,
    ) -> CausalLMOutput:
        """`model(input_ids, ...)` as the reference's forward, without a cache. Every step runs; the
        logits follow the reference's order of priority:

        1. `labels` given: the exit-weighted mixture of the steps' logits, and `loss`, the mean
           cross-entropy of each position against the next label (-100 ignored), in fp32. This is
           the reference's convenience path, not the paper's objective (`looplm train` has that).
        2. a fixed 0-based step (`exit_at_step`, else the config's `early_exit_step`) within range;
        3. the threshold rule (`exit_threshold`, else the config's `early_exit_threshold`);
        4. the weighted mixture if `use_weighted_exit`, else the last step.
        """
        fixed = self.config.early_exit_step if exit_at_step is None else exit_at_step
        threshold = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        total = self.config.total_ut_steps if steps is None else steps
        fixed_applies = fixed is not None and 0 <= fixed < total
        mixture = labels is not None or (use_weighted_exit and threshold is None and not fixed_applies)
        out = self.forward_steps(input_ids, attention_mask, steps, with_logits=mixture)  # else: one step's lm_head
        if not mixture:
            logits, exit_steps = self.exit_logits(out, threshold, exit_at_step=fixed)
            return CausalLMOutput(logits, exit_steps=exit_steps)
        logits = mix_steps(out.exit_probs, out.logits)
        loss = None if labels is None else shifted_cross_entropy(logits, labels, input_ids)
        return CausalLMOutput(logits, loss=loss)

    def exit_logits(
        self,
        out: StepOutput,
        exit_threshold: float | None = None,
        position: int | None = None,
        exit_at_step: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the step each token exits at, and those steps.

        `exit_threshold` None means the config's `early_exit_threshold` (1.0 in Ouro configs),
        applied with the reference's running-sum rule in the model dtype. A fixed 0-based step
        (`exit_at_step`, else the config's `early_exit_step`) within range comes first, as in the
        reference. `position` restricts the work to one sequence position (decoding needs only the last).
        """
        hidden, probs = out.hidden_states, out.exit_probs
        if position is not None:
            one = slice(position, position + 1 or None)  # position -1 is the last: [-1:None], not [-1:0]
            hidden, probs = hidden[:, :, one], probs[:, :, one]
        threshold = self.config.early_exit_threshold if exit_threshold is None else exit_threshold
        fixed = self.config.early_exit_step if exit_at_step is None else exit_at_step
        exit_steps = select_exit_steps(probs, threshold, fixed)
        return self.lm_head(gather_steps(hidden, exit_steps)), exit_steps

    def readout_tokens(self, out: StepOutput, policy: ExitPolicy) -> tuple[torch.Tensor, torch.Tensor]:
        """`readout` of N tokens at once, given as `[T, N, ...]` (any positions of any rows, e.g.
        every position of one row): each token is read as its own row. Logits `[N, V]`, steps `[N]`."""
        as_rows = StepOutput(hidden_states=out.hidden_states.unsqueeze(2), gate_lambda=out.gate_lambda.unsqueeze(2),
                             exit_probs=out.exit_probs.unsqueeze(2))
        return self.readout(as_rows, policy, position=0)

    def readout(self, out: StepOutput, policy: ExitPolicy, position: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply an exit policy to every step of one position (all steps were computed).

        Returns the logits `[B, V]` each row reads and its 0-based exit step `[B]`.
        """
        hidden = out.hidden_states[:, :, position]  # (T, B, hidden)
        lambdas = out.gate_lambda[:, :, position] if self.model.early_exit_gate is not None else None
        steps, batch = hidden.shape[0], hidden.shape[1]
        rows = torch.arange(batch, device=hidden.device)
        policy.reset(batch, hidden.dtype, hidden.device)
        exit_step = torch.full((batch,), steps - 1, dtype=torch.long, device=hidden.device)
        decided = torch.zeros(batch, dtype=torch.bool, device=hidden.device)
        per_step_logits = []
        for step in range(steps):
            step_logits = self.lm_head(hidden[step]) if policy.needs_logits else None
            per_step_logits.append(step_logits)
            lam = None if lambdas is None else lambdas[step]
            done = policy.exits(StepView(step, steps, rows, batch, lam, step_logits))
            exit_step = torch.where(done & ~decided, step, exit_step)
            decided |= done
        mixed = policy.readout(per_step_logits)
        if mixed is not None:
            return mixed, exit_step
        return self.lm_head(gather_steps(hidden.unsqueeze(2), exit_step.unsqueeze(1)).squeeze(1)), exit_step

    def decode_step(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor | None,
        cache: KVCache,
        steps: int,
        policy: ExitPolicy,
        skip_compute: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row `[B, 1]` through up to `steps` UT steps, with a cache.

        After each step the policy says which rows exit; a row reads the logits of its exit step.
        With `skip_compute` a row that exits stops computing: the active rows are compacted, and
        the cache fills the (step, layer) slots it skipped (`KVCache.fill_skipped`). Without it,
        every step runs and only the readout is chosen (the reference's behaviour).
        Returns logits `[B, V]` and the 0-based exit step of each row `[B]`.
        """
        batch, num_layers = token_ids.shape[0], self.config.num_hidden_layers
        position = cache.length
        skip = skip_compute and policy.can_skip
        bias = AttentionBias.build(key_valid, 1, position, token_ids.device)
        h = self.model.embed_tokens(token_ids)  # (B, 1, hidden)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        policy.reset(batch, h.dtype, h.device)
        rows = torch.arange(batch, device=h.device)
        subset: torch.Tensor | None = None  # None while every row is still computing
        exit_step = torch.full((batch,), steps - 1, dtype=torch.long, device=h.device)
        decided = torch.zeros(batch, dtype=torch.bool, device=h.device)
        logits = torch.empty(batch, self.config.vocab_size, dtype=h.dtype, device=h.device)
        per_step_logits = []
        for step in range(steps):
            step_bias = bias.select(subset)
            step_cos, step_sin = (cos, sin) if subset is None else (cos[subset], sin[subset])
            for index, layer in enumerate(self.model.layers):
                h = layer(h, step_cos, step_sin, step_bias, cache, step * num_layers + index, subset)
            h = self.model.norm(h)
            lam = None
            if self.model.early_exit_gate is not None:
                lam = torch.sigmoid(self.model.early_exit_gate(h[:, 0]).squeeze(-1))  # (N,)
            step_logits = self.lm_head(h[:, 0]) if policy.needs_logits else None
            per_step_logits.append(step_logits)
            done = policy.exits(StepView(step, steps, rows, batch, lam, step_logits))
            first = done & ~decided[rows]
            if first.any():
                exiting = rows[first]
                logits[exiting] = step_logits[first] if step_logits is not None else self.lm_head(h[first, 0])
                exit_step[exiting] = step
                decided[exiting] = True
            if skip and done.any() and step < steps - 1:
                cache.fill_skipped(rows[done], step, position)
                rows, h = rows[~done], h[~done]
                subset = rows
                if rows.numel() == 0:
                    break
        cache.advance(1)
        mixed = policy.readout(per_step_logits)
        return (logits if mixed is None else mixed), exit_step

    def step_logprobs(
        self,
        input_ids: torch.Tensor,
        target_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Per-loop log-probabilities `[T, B, S]` of `target_ids` `[B, S]` (what RLTT rewards).

        Differentiable: call it outside inference mode to train on it. log-softmax runs in fp32.
        """
        if target_ids.shape != input_ids.shape:  # gather would silently truncate a shorter target
            raise GenerationError(f"target_ids shape {list(target_ids.shape)} != input_ids shape "
                                  f"{list(input_ids.shape)}: give one target per input position")
        check_token_ids(target_ids, self.config.vocab_size)
        out = self.forward_steps(input_ids, attention_mask=attention_mask, steps=steps)
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        index = target_ids.unsqueeze(0).expand(logprobs.shape[0], *target_ids.shape).unsqueeze(-1)
        return torch.gather(logprobs, -1, index).squeeze(-1)

    def resolve_steps(self, steps: int | None) -> int:
        if steps is None:
            return self.config.total_ut_steps
        self.config.with_steps(steps)  # validates the range and warns outside 2-4
        return steps

    def generate(self, input_ids, max_new_tokens: int, **kwargs):  # noqa: ANN001, ANN201 - see looplm.generate
        """Generate new tokens; see `looplm.generate.generate` for every argument."""
        from looplm.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position i's logits against labels[i + 1], positions labelled -100
    (and the last) left out, in fp32: the loss of HF's causal LMs, which the reference returns."""
    if labels.shape != input_ids.shape or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise GenerationError(f"labels must be integer ids shaped like input_ids {list(input_ids.shape)}, got a "
                              f"{str(labels.dtype).removeprefix('torch.')} tensor {list(labels.shape)}")
    targets = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids must be a `[B, S]` integer tensor of ids the embedding table has: float ids would
    be truncated without a word, and an id past the table fails deep inside the embedding."""
    dtype = input_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise GenerationError(f"input_ids must be integer token ids, got a {str(dtype).removeprefix('torch.')} tensor")
    if input_ids.dim() != 2:
        raise GenerationError(f"input_ids must have shape [batch, sequence], got {list(input_ids.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise GenerationError(f"token ids must be in [0, {vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}")


def positions_from_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions `[B, S]` of a prompt: 0, 1, ... per row; with left padding a row's first real
    token is at position 0 (cumsum(mask) - 1)."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)
