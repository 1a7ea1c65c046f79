"""Static-shape decoding: one decode step whose tensor shapes never change between tokens.

The normal decode step (`OuroForCausalLM.decode_step`) attends over `cache.length` keys, a
Python int that grows by one per token, and may drop rows that exit early. Both change shapes
(and the second is data-dependent), so neither a CUDA graph nor `torch.compile(dynamic=False)`
can be reused from one token to the next. Here instead:

- the batch and the cache length are fixed: the preallocated `KVCache` buffers are reused;
- the write index (`length`) and the RoPE positions are device tensors, advanced in place;
- every (step, layer) attends over the WHOLE preallocated key length, with a boolean mask of
  the positions written so far (`key_valid`, also advanced in place);
- every UT step runs; the exit policy only chooses which step's state is read out
  (`OuroForCausalLM.readout`, the same rule the prefill uses). No compute is skipped.

The prefill stays on the normal dynamic path (`run_steps`), writing into the same buffers.

`StaticDecoder` wraps this: on CUDA it can capture the step in a `torch.cuda.CUDAGraph`
(mode "graph"), compile its layer pass with `torch.compile(fullgraph=True, dynamic=False)` ("compile"),
or both ("compile+graph"); on CPU it runs eagerly (or compiled). `looplm.generate(...,
decoder=MODE)` runs through it (`static_decoder` keeps the last decoder with the model for
reuse); the default decoder of the library is still the dynamic one.

Cost of static shapes: attention reads the full `max_len` keys every step, so size the cache
to what the generation needs (`generate(decoder=...)` uses prompt + max_new_tokens rounded up
to `CAPACITY_BUCKET`, so that nearby requests can reuse one decoder).
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from looplm.cache import Segments
from looplm.decode_job import TokenJob, device_elapsed
from looplm.errors import GenerationError
from looplm.exit import ExitPolicy, make_policy
from looplm.models.ouro import (
    AttentionBias,
    OuroForCausalLM,
    StepOutput,
    positions_from_mask,
    rope_tables,
    segmented_attention,
)
from looplm.sampling import TokenChooser

MODES = ("auto", "eager", "compile", "graph", "compile+graph")
ATTENTIONS = ("sdpa", "matmul", "flex")  # how a static slot attends; flex: CUDA, compile modes only


class StaticSlot:
    """One (step, layer) slot's K/V buffers `[B, H_kv, S_max, D]`, seen with a device-side length.

    `Attention.forward` calls `cache.update(slot, cache.length, k, v, rows)`; here `length` is
    a `[1]` int64 tensor, so the write position is data, not a Python int baked into the
    graph, and the returned keys/values always span all `S_max` positions (masked by the caller).
    The slot number is ignored: this object is the slot. So every layer pass hands the layer the
    same Python constants and other tensors only, and one compiled layer serves all T x L passes.

    Each slot is its own tensor, not a view of one `[T*L, ...]` buffer: under `torch.compile`
    an in-place write into a view of a graph input is functionalized into a copy of the whole
    base buffer every step, while an `index_put_` on a whole input is done in place.
    """

    mode = "static"

    def __init__(self, key: torch.Tensor, value: torch.Tensor, length: torch.Tensor, attention=None) -> None:  # noqa: ANN001
        self.key, self.value, self.length = key, value, length
        self.attention = attention  # None: `Attention.attend`'s SDPA; else called as attention(q, k, v, bias)

    def update(
        self, slot: int, start: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None = None
    ) -> Segments:
        if rows is not None:
            raise ValueError("the static cache has no row subsets: every row runs every step")
        # A tensor index: the same kernel for every token, capturable in a CUDA graph.
        self.key[:, :, start] = key
        self.value[:, :, start] = value
        return [(self.key, self.value)]


def layer_pass(layer: torch.nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: AttentionBias,
               slot: StaticSlot) -> torch.Tensor:
    """One decoder layer on one slot: the unit `torch.compile` compiles (regional compilation).

    Compiling the whole step unrolls T x L layers into one graph (192 for 2.6B), which took
    Inductor over 110 s on an H200 machine for the 1.4B shape; a layer compiles once and is
    reused for every layer and step, since Dynamo lifts a module's weights to graph inputs
    and does not specialise on which layer or slot it is given."""
    return layer(h, cos, sin, bias, slot, 0)


def fused_layer_pass(layer: torch.nn.Module, qkv: torch.Tensor, gate_up: torch.Tensor, h: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, bias: AttentionBias, slot: StaticSlot) -> torch.Tensor:
    """`DecoderLayer.forward` with q/k/v as one GEMM and gate/up as another (weights `qkv`
    `[(H + 2 H_kv) D, hidden]` and `gate_up` `[2 I, hidden]`): two launches instead of five per pass.
    The weights are tensor arguments, so one compiled graph still serves every layer."""
    attn = layer.self_attn
    sizes = [attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim]
    q, k, v = F.linear(layer.input_layernorm(h), qkv).split(sizes, dim=-1)
    h = h + layer.input_layernorm_2(attn.attend(q, k, v, cos, sin, bias, slot, 0))
    gate, up = F.linear(layer.post_attention_layernorm(h), gate_up).chunk(2, dim=-1)
    return h + layer.post_attention_layernorm_2(layer.mlp.combine(gate, up))


def flex_attention_over_valid_keys(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                   bias: AttentionBias) -> torch.Tensor:
    """Attention of `q` `[B, H, 1, D]` over the whole static cache `[B, H_kv, S_max, D]` with
    FlexAttention: keys not marked in the mask `[B, 1, 1, S_max]` score -inf. Compiled, it is
    one fused kernel (a split-K decoding kernel on CUDA), and GQA reads the K/V heads in place
    instead of repeating the full-length cache per query group as the SDPA path does."""
    from torch.nn.attention.flex_attention import flex_attention

    valid = bias.mask

    def mask_invalid(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - FlexAttention's score_mod signature
        return torch.where(valid[b, 0, 0, kv_idx], score, float("-inf"))

    return flex_attention(q, keys, values, score_mod=mask_invalid, enable_gqa=keys.shape[1] != q.shape[1])


def matmul_attention_over_valid_keys(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                     bias: AttentionBias) -> torch.Tensor:
    """The same attention as two batched matmuls around an fp32 masked softmax
    (`segmented_attention` with one segment): GQA groups share their K/V head without a copy,
    and under `torch.compile` the mask, scaling and softmax fuse into one kernel."""
    return segmented_attention(q, [(keys, values)], bias.mask)


ATTENTION_FUNCTIONS = {"sdpa": None, "matmul": matmul_attention_over_valid_keys,
                       "flex": flex_attention_over_valid_keys}


def fuse_layer_projections(model: OuroForCausalLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (q|k|v, gate|up) weights concatenated along the outputs: new tensors, so the
    model is left as it was (the copies cost 69% of the layer weights again at the 1.4B shape)."""
    fused = []
    for index, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        modules = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        if any(type(m) is not nn.Linear or m.bias is not None for m in modules):
            raise GenerationError(f"fuse_projections needs plain unbiased nn.Linear projections (layer {index} has "
                                  f"{', '.join(sorted({type(m).__name__ for m in modules}))}); quantized models cannot fuse")
        fused.append((torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                      torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()))
    return fused


class PrefillSlotCache:
    """The same per-slot buffers with a Python-int length, for the dynamic prefill (`run_steps`)."""

    mode = "full"

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.max_len = keys[0].shape[2]
        self.length = 0

    def update(
        self, slot: int, start: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor | None = None
    ) -> Segments:
        end = start + key.shape[2]
        if rows is not None or end > self.max_len:
            raise ValueError(f"prefill writes all rows within the cache (end {end}, capacity {self.max_len})")
        self.keys[slot][:, :, start:end] = key
        self.values[slot][:, :, start:end] = value
        return [(self.keys[slot][:, :, :end], self.values[slot][:, :, :end])]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


def resolve_mode(mode: str, device: torch.device) -> str:
    """'auto' is 'graph' on CUDA and 'eager' elsewhere; graph modes need CUDA."""
    if mode not in MODES:
        raise GenerationError(f"unknown static decode mode '{mode}' (choose from {', '.join(MODES)})")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if "graph" in mode and device.type != "cuda":
        raise GenerationError(f"static decode mode '{mode}' captures a CUDA graph and needs a CUDA model (this one "
                              f"is on {device}); use 'eager', or the 'dynamic' decoder")
    return mode


def compile_settings(compile_mode: str, compile_options: dict | None) -> dict:
    """`torch.compile` keyword arguments for a mode plus Inductor config overrides.

    torch.compile takes a mode or an options dict, not both, so extra options are merged into
    the mode's own options. E.g. `{"coordinate_descent_tuning": True}`: on CUDA, Inductor then
    lowers a one-row matmul to a reduction it can fuse with the norm before it (its own note says
    one-row matmuls reach peak bandwidth only so), instead of calling cuBLAS."""
    if not compile_options:
        return {"mode": compile_mode}
    from torch import _inductor

    try:
        merged = dict(_inductor.list_mode_options(compile_mode))
    except (KeyError, RuntimeError) as exc:  # "Unrecognized mode=..., should be one of: ..."
        raise GenerationError(f"torch.compile: {exc}") from None
    known = _inductor.config.get_config_copy()
    unknown = sorted(name for name in compile_options if name not in known)
    if unknown:
        raise GenerationError(f"unknown Inductor option(s) {', '.join(unknown)} (see torch._inductor.config)")
    merged.update(compile_options)
    return {"options": merged}


class StaticDecoder:
    """Prefill (dynamic) then one-token decode steps with fixed shapes, optionally graphed/compiled.

    Usage: `logits, exit_step = dec.prefill(ids, mask)`, then `dec.step(next_token)` per token.
    In graph modes the returned tensors are the graph's static outputs: read (or copy) them
    before the next `step`. The decoder can be reused for several prompts of the same batch
    size; each `prefill` resets its state. Shapes: logits `[B, V]`, exit step `[B]` (0-based).
    """

    def __init__(
        self,
        model: OuroForCausalLM,
        batch_size: int,
        max_len: int,
        steps: int | None = None,
        policy: ExitPolicy | None = None,
        mode: str = "auto",
        compile_mode: str = "default",
        warmup: int = 2,
        attention: str = "sdpa",
        fuse_projections: bool = False,
        compile_options: dict | None = None,
    ) -> None:
        if batch_size < 1 or max_len < 2:
            raise GenerationError(f"need batch_size >= 1 and max_len >= 2, got {batch_size} and {max_len}")
        self.model = model
        self.steps = model.resolve_steps(steps)
        config = model.config
        if policy is None:
            policy = make_policy(None, None, self.steps, config.early_exit_threshold, config.early_exit_step)
        # Separate policy objects: the captured step owns tensors the prefill must not replace.
        self.policy, self.prefill_policy = policy, copy.deepcopy(policy)
        self.mode = resolve_mode(mode, model.device)
        if attention not in ATTENTIONS:
            raise GenerationError(f"unknown static attention '{attention}' (choose from {', '.join(ATTENTIONS)})")
        if attention == "flex" and ("compile" not in self.mode or model.device.type != "cuda"):
            # Uncompiled FlexAttention materialises every score; its compiled CPU kernel gave wrong
            # outputs on torch 2.13 for head_dim 16 at some cache lengths (40, not 48 or 64).
            raise GenerationError("attention='flex' is for CUDA models in a compile mode ('compile' or "
                                  f"'compile+graph'); this one is on {model.device} in mode '{self.mode}'")
        self.attention = attention
        self.fused = fuse_layer_projections(model) if fuse_projections else None
        self.batch_size, self.max_len = batch_size, max_len
        device = model.device
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        slots = self.steps * config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(slots)]
        self.values = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(slots)]
        # The step's inputs, all device tensors at fixed addresses (a CUDA graph replays on them).
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.length = torch.zeros(1, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.slots = [StaticSlot(k, v, self.length, ATTENTION_FUNCTIONS[attention])
                      for k, v in zip(self.keys, self.values)]
        self.host_length = 0  # mirrors `length` without a device sync, for the overflow check
        self.prompts_served = 0  # prefills so far (a reused decoder has served earlier requests)
        self.in_use = False  # a generation is reading this decoder's state (see `borrow_static_decoder`)
        self.setup_seconds = 0.0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._layer_pass = fused_layer_pass if fuse_projections else layer_pass
        if "compile" in self.mode:
            self._layer_pass = torch.compile(self._layer_pass, fullgraph=True, dynamic=False,
                                             **compile_settings(compile_mode, compile_options))
        started = time.perf_counter()
        try:
            with torch.no_grad():
                if "graph" in self.mode:
                    self._capture(max(1, min(warmup, max_len - 1)))
                elif "compile" in self.mode:
                    self._step_impl()  # compile now, on the zero state, not inside the first timed token
        except torch._dynamo.exc.TorchDynamoException as exc:
            # e.g. a bf16 CPU model: Dynamo cannot trace looplm's C++ kernels (pybind functions).
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GenerationError(
                f"torch.compile could not compile this model's decode step ({first_line}); a model on looplm's C++ "
                "CPU kernels cannot be compiled: load it with kernels='torch' (LOOPLM_KERNELS=torch), or use the "
                "'eager' or 'dynamic' decoder"
            ) from exc
        self.setup_seconds = time.perf_counter() - started

    # -- the static step ----------------------------------------------------------------------

    def _step_impl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode `self.token` at `self.position`, writing K/V at `self.length`; then advance both."""
        model, num_layers = self.model, self.model.config.num_hidden_layers
        self.key_valid.index_fill_(1, self.length, True)  # this token's own key becomes visible
        bias = AttentionBias(self.key_valid[:, None, None, :], is_causal=False)  # (B, 1, 1, S_max)
        h = model.model.embed_tokens(self.token)  # (B, 1, hidden)
        cos, sin = rope_tables(self.position, model.config.head_dim, model.config.rope_theta, h.dtype)
        states, gates = [], []
        for step in range(self.steps):
            for index, layer in enumerate(model.model.layers):
                slot = self.slots[step * num_layers + index]
                if self.fused is not None:
                    h = self._layer_pass(layer, *self.fused[index], h, cos, sin, bias, slot)
                else:
                    h = self._layer_pass(layer, h, cos, sin, bias, slot)
            h = model.model.norm(h)
            states.append(h)
            if model.model.early_exit_gate is not None:
                gates.append(torch.sigmoid(model.model.early_exit_gate(h).squeeze(-1)))
        logits, exit_step = model.readout(StepOutput.stack(states, gates), self.policy, position=-1)
        self.position.add_(1)
        self.length.add_(1)
        return logits, exit_step

    def _capture(self, warmup: int) -> None:
        """Warm up on a side stream (cuBLAS handles, compilation), then capture one step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step_impl()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._graph_out = self._step_impl()
        self._graph = graph
        # Warmup ran on the zero state and wrote garbage K/V at its first positions. `prefill`
        # overwrites the prompt positions and resets `key_valid`; a later position becomes
        # visible only in the step that rewrites it, so the garbage is never attended to.

    # -- public API ---------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt `[B, P]` through the normal dynamic path into the static buffers.

        `attention_mask` marks left padding (None: no padding). Returns the first new token's
        logits `[B, V]` and exit steps `[B]`, exactly as `generate`'s prefill computes them.
        """
        batch, prompt_len = input_ids.shape
        if batch != self.batch_size:
            raise GenerationError(f"this decoder was built for batch {self.batch_size}, got {batch}")
        if prompt_len >= self.max_len:
            raise GenerationError(f"prompt of {prompt_len} tokens leaves no room in a cache of {self.max_len}")
        device = self.model.device
        ids = input_ids.to(device)
        mask = None if attention_mask is None else attention_mask.to(device)
        positions = positions_from_mask(mask, ids)
        cache = PrefillSlotCache(self.keys, self.values)
        out = self.model.run_steps(ids, positions, mask, cache, self.steps)  # type: ignore[arg-type]
        logits, exit_step = self.model.readout(out, self.prefill_policy, position=-1)
        self.key_valid.zero_()
        self.key_valid[:, :prompt_len] = True if mask is None else mask.bool()
        self.position.copy_(positions[:, -1:] + 1)
        self.length.fill_(prompt_len)
        self.host_length = prompt_len
        self.prompts_served += 1
        return logits, exit_step

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row `[B]` (or `[B, 1]`); returns logits `[B, V]`, exit steps `[B]`."""
        if self.host_length == 0:
            raise GenerationError("call prefill() before step()")
        if self.host_length >= self.max_len:
            raise GenerationError(f"static KV cache full: {self.max_len} positions")
        self.token.copy_(token_ids.reshape(self.batch_size, 1))
        self.host_length += 1
        if self._graph is not None:
            self._graph.replay()
            return self._graph_out
        return self._step_impl()

    def kv_bytes_read_per_step(self) -> int:
        """K and V bytes one step reads: every slot over the whole preallocated length."""
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)


CAPACITY_BUCKET = 256  # cache lengths are rounded up to this, so nearby requests share one decoder
_CACHED = "_looplm_static_decoder"  # the model attribute holding the last decoder built for it


def _policy_key(policy: ExitPolicy) -> tuple:
    """What makes two policies behave the same: their class and plain settings (not their state)."""
    plain = (int, float, str, bool, type(None))
    return type(policy), tuple(sorted((k, v) for k, v in vars(policy).items() if isinstance(v, plain)))


def static_decoder(
    model: OuroForCausalLM,
    batch_size: int,
    needed_len: int,
    steps: int,
    policy: ExitPolicy,
    mode: str,
    compile_mode: str = "default",
) -> StaticDecoder:
    """A `StaticDecoder` for this request, reusing the model's last one when it fits.

    Building one allocates the cache and, in graph or compile modes, captures or compiles the
    step (seconds on a GPU), so the last decoder stays with the model and serves every later
    request with the same batch, steps, mode, exit rule and capacity bucket. Its capacity is
    `needed_len` rounded up to `CAPACITY_BUCKET` positions (static attention reads the whole
    capacity every step). It is rebuilt when the model's tensors moved (a captured graph
    reads fixed addresses), e.g. after quantizing or moving the model.
    """
    capacity = -(-needed_len // CAPACITY_BUCKET) * CAPACITY_BUCKET
    weights = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    key = (batch_size, capacity, steps, _policy_key(policy), resolve_mode(mode, model.device), compile_mode, weights)
    cached = model.__dict__.get(_CACHED)
    if cached is not None and cached[0] == key:
        return cached[1]
    model.__dict__.pop(_CACHED, None)  # free the old buffers before allocating new ones
    decoder = StaticDecoder(model, batch_size, capacity, steps, policy, mode, compile_mode)
    model.__dict__[_CACHED] = (key, decoder)
    return decoder


_BORROWING = threading.Lock()


@contextmanager
def borrow_static_decoder(
    model: OuroForCausalLM, batch_size: int, needed_len: int, steps: int, policy: ExitPolicy, mode: str,
) -> Iterator[StaticDecoder]:
    """`static_decoder` for one generation: the model's kept decoder while no other generation
    holds it, else a decoder of this generation's own (built, used, dropped). A decoder's
    buffers are one generation's state, so two generations interleaved (two threads, two
    streams advanced in turns) on one decoder would overwrite each other's."""
    with _BORROWING:
        decoder = static_decoder(model, batch_size, needed_len, steps, policy, mode)
        kept = not decoder.in_use
        decoder.in_use = True
    if not kept:  # built outside the lock: capturing a graph takes seconds
        decoder = StaticDecoder(model, batch_size, decoder.max_len, steps, policy, mode)
        decoder.in_use = True
    try:
        yield decoder
    finally:
        decoder.in_use = False


def release_static_decoder(model: OuroForCausalLM) -> bool:
    """Free the decoder `static_decoder` keeps with `model` (its K/V buffers and captured graph);
    True if there was one. The next static request builds a new one."""
    return model.__dict__.pop(_CACHED, None) is not None


def static_tokens(job: TokenJob, mode: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`looplm.generate.decode_tokens` through a (reused) `StaticDecoder`: yields `(tokens [B],
    exit_steps [B])` per new position, as the dynamic step would, from fixed-shape decode steps."""
    model, stats = job.model, job.stats
    batch, prompt_len = job.ids.shape
    start = time.perf_counter()
    with borrow_static_decoder(model, batch, prompt_len + job.max_new_tokens, job.steps, job.policy, mode) as decoder:
        stats.setup_s = device_elapsed(start, model.device) if decoder.prompts_served == 0 else 0.0
        choose = TokenChooser(job.sampling, job.generator, job.ids, job.mask)
        start = time.perf_counter()
        logits, exit_step = decoder.prefill(job.ids, job.mask)
        token = choose(logits)
        stats.prefill_s = device_elapsed(start, model.device)
        stats.new_tokens = 1
        # A CUDA graph's outputs are overwritten by the next step: hand out copies.
        yield token, exit_step.clone()
        for _ in range(job.max_new_tokens - 1):
            start = time.perf_counter()
            logits, exit_step = decoder.step(token)
            token = choose(logits)
            stats.decode_s += device_elapsed(start, model.device)
            stats.new_tokens += 1
            yield token, exit_step.clone()


__all__ = [
    "ATTENTIONS", "CAPACITY_BUCKET", "MODES", "PrefillSlotCache", "StaticDecoder", "StaticSlot", "borrow_static_decoder",
    "flex_attention_over_valid_keys", "fuse_layer_projections", "fused_layer_pass", "layer_pass",
    "matmul_attention_over_valid_keys", "release_static_decoder", "resolve_mode", "static_decoder",
    "static_tokens",
]
