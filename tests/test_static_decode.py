"""The static-shape decode step gives the same tokens and exit steps as the normal generate path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import decode_greedily, random_prompts

import looplm
from looplm.errors import GenerationError
from looplm.generate import generate, generate_static, resolve_decoder, stream_generate
from looplm.static_decode import (
    CAPACITY_BUCKET,
    StaticDecoder,
    release_static_decoder,
    static_decoder,
)


@pytest.fixture
def mha_model(make_checkpoint):  # noqa: ANN001, ANN201
    return looplm.load(make_checkpoint(seed=1), dtype="float32")


@pytest.fixture
def gqa_model(make_checkpoint):  # noqa: ANN001, ANN201
    path = make_checkpoint(seed=3, num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3, rope_theta=5e5)
    return looplm.load(path, dtype="float32")


def both(model, prompts, new_tokens: int, **kwargs):  # noqa: ANN001, ANN201
    dynamic, dyn_stats = generate(model, prompts, new_tokens, return_stats=True, **kwargs)
    static, static_stats = generate_static(model, prompts, new_tokens, return_stats=True, **kwargs)
    return dynamic, static, dyn_stats.steps_per_token, static_stats.steps_per_token


@pytest.mark.parametrize("kwargs", [
    {},  # the config's gate rule at threshold 1.0
    {"exit_policy": "last"},
    {"exit_threshold": 0.5},  # the gate exits early on some tokens
    {"exit_policy": "confidence", "exit_threshold": 0.01},
    {"exit_policy": "weighted"},
])
def test_greedy_tokens_and_exit_steps_match_generate(mha_model, kwargs: dict) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [13], seed=2)
    dynamic, static, dyn_steps, static_steps = both(mha_model, prompt, 16, eos_token_ids=[], **kwargs)
    assert static == dynamic
    assert static_steps == dyn_steps
    assert len(static[0]) == 16


def test_gate_threshold_really_exits_early(mha_model) -> None:  # noqa: ANN001
    """Guards the test above: at threshold 0.5 the chosen steps are not all the last one."""
    _, _, _, steps = both(mha_model, random_prompts(300, [13], seed=2), 16, eos_token_ids=[], exit_threshold=0.5)
    assert min(steps[0]) < 4


def test_gqa_left_padded_batch_matches_generate(gqa_model) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [5, 19, 11], seed=1)
    for kwargs in ({}, {"exit_threshold": 0.5}):
        dynamic, static, dyn_steps, static_steps = both(gqa_model, prompts, 20, eos_token_ids=[], **kwargs)
        assert static == dynamic
        assert static_steps == dyn_steps


def test_fixed_exit_step_from_config(make_checkpoint) -> None:  # noqa: ANN001
    model = looplm.load(make_checkpoint(seed=5, early_exit_step=1), dtype="float32")  # FixedPolicy(2) of 4
    dynamic, static, dyn_steps, static_steps = both(model, random_prompts(300, [7, 12], seed=3), 10, eos_token_ids=[])
    assert static == dynamic
    assert static_steps == dyn_steps == [[2] * 10, [2] * 10]


def test_fewer_steps_than_the_config(gqa_model) -> None:  # noqa: ANN001
    dynamic, static, _, _ = both(gqa_model, random_prompts(300, [9], seed=6), 12, eos_token_ids=[], steps=2)
    assert static == dynamic


def test_sampling_with_seed_matches_generate(gqa_model) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [6, 10], seed=4)
    dynamic, static, _, _ = both(gqa_model, prompts, 12, eos_token_ids=[], temperature=0.9, top_k=50, seed=11)
    assert static == dynamic


def test_rows_stop_at_eos_like_generate(gqa_model) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [8, 15], seed=7)
    free = generate(gqa_model, prompts, 12, eos_token_ids=[])
    eos = free[0][3]  # a token the first row emits at step 4
    dynamic = generate(gqa_model, prompts, 12, eos_token_ids=[eos])
    static = generate_static(gqa_model, prompts, 12, eos_token_ids=[eos])
    assert static == dynamic
    assert static[0][-1] == eos and len(static[0]) <= 4


def test_decoder_is_reusable_and_keeps_shapes(gqa_model) -> None:  # noqa: ANN001
    """One decoder, two prompts: every step's outputs have the same shapes; the second run is
    unaffected by the first (prefill resets the mask, positions and length)."""
    first, second = (torch.tensor([p]) for p in random_prompts(300, [9, 14], seed=8))
    decoder = StaticDecoder(gqa_model, batch_size=1, max_len=32)
    results = []
    for prompt in (first, second, first):
        logits, _ = decoder.prefill(prompt)
        tokens = [int(logits.argmax(-1))]
        for _ in range(8):
            logits, exit_step = decoder.step(logits.argmax(-1))
            assert logits.shape == (1, 300) and exit_step.shape == (1,)
            tokens.append(int(logits.argmax(-1)))
        results.append(tokens)
    assert results[0] == results[2]
    assert results[0] == generate(gqa_model, first, 9, eos_token_ids=[])[0]
    assert results[1] == generate(gqa_model, second, 9, eos_token_ids=[])[0]


def test_decoder_refuses_overflow_and_bad_use(gqa_model) -> None:  # noqa: ANN001
    decoder = StaticDecoder(gqa_model, batch_size=1, max_len=6)
    with pytest.raises(GenerationError, match="prefill"):
        decoder.step(torch.tensor([5]))
    with pytest.raises(GenerationError, match="batch"):
        decoder.prefill(torch.tensor([[5, 6], [7, 8]]))
    logits, _ = decoder.prefill(torch.tensor([[5, 6, 7, 8]]))
    decoder.step(logits.argmax(-1))
    decoder.step(logits.argmax(-1))
    with pytest.raises(GenerationError, match="full"):
        decoder.step(logits.argmax(-1))


@pytest.mark.parametrize("mode", ["graph", "compile+graph", "nonsense"])
def test_graph_modes_need_cuda(gqa_model, mode: str) -> None:  # noqa: ANN001
    with pytest.raises(GenerationError, match="CUDA|unknown"):
        StaticDecoder(gqa_model, batch_size=1, max_len=8, mode=mode)


def test_bf16_runs_and_mostly_agrees(gqa_model) -> None:  # noqa: ANN001
    """bf16 on CPU: SDPA over the full masked length sums in another order than over the
    valid prefix, so exact token equality is not promised; the first tokens agree."""
    model = gqa_model.to(torch.bfloat16)
    prompt = random_prompts(300, [10], seed=9)
    dynamic = generate(model, prompt, 6, eos_token_ids=[])
    static = generate_static(model, prompt, 6, eos_token_ids=[])
    assert len(static[0]) == 6
    assert static[0][0] == dynamic[0][0]  # the first token comes from the shared prefill


def test_compiled_step_matches_generate(gqa_model) -> None:  # noqa: ANN001
    """torch.compile(fullgraph=True, dynamic=False) of the layer pass on CPU (about 20 s on 2
    cores without Inductor's cache): generate's tokens, and ONE compiled graph for all 6 (step, layer) slots."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    prompts = random_prompts(300, [5, 19, 11], seed=1)
    dynamic = generate(gqa_model, prompts, 12, eos_token_ids=[], exit_threshold=0.5)
    static = generate_static(gqa_model, prompts, 12, eos_token_ids=[], exit_threshold=0.5, mode="compile")
    assert static == dynamic
    assert counters["stats"]["unique_graphs"] == 1


def test_decoder_choice_and_refusals(gqa_model) -> None:  # noqa: ANN001
    """'auto' is the CUDA graph on a GPU only where the request allows the static step; an
    explicit static mode that cannot serve the request is refused, not silently replaced."""
    gpu = SimpleNamespace(device=torch.device("cuda"))
    assert resolve_decoder("auto", gpu, True, "full", False) == "graph"
    assert resolve_decoder("auto", gpu, True, "shared", False) == "dynamic"
    assert resolve_decoder("auto", gpu, True, "full", True) == "dynamic"
    assert resolve_decoder("auto", gpu, False, "full", False) == "dynamic"
    assert resolve_decoder("auto", gqa_model, True, "full", False) == "dynamic"  # a CPU model
    assert resolve_decoder("eager", gqa_model, True, "full", False) == "eager"
    for args, needle in [(("graph", gqa_model, True, "full", False), "CUDA"),
                         (("eager", gqa_model, True, "shared", False), "kv_mode"),
                         (("compile", gqa_model, True, "full", True), "skip_compute"),
                         (("eager", gqa_model, False, "full", False), "use_cache"),
                         (("fast", gqa_model, True, "full", False), "unknown decoder")]:
        with pytest.raises(GenerationError, match=needle):
            resolve_decoder(*args)
    with pytest.raises(GenerationError, match="kv_mode"):
        generate(gqa_model, [[1, 2, 3]], 4, decoder="eager", kv_mode="shared")


def test_stream_generate_through_the_static_step(gqa_model) -> None:  # noqa: ANN001
    """Events, finish reasons and stats from the static step equal the dynamic step's."""
    prompts = random_prompts(300, [6, 13], seed=12)
    eos = generate(gqa_model, prompts, 10, eos_token_ids=[])[1][4]
    runs = {}
    for decoder in ("dynamic", "eager"):
        events = list(stream_generate(gqa_model, prompts, 10, eos_token_ids=[eos], decoder=decoder))
        runs[decoder] = [(e.tokens, e.exit_steps, e.finished) for e in events]
    assert runs["eager"] == runs["dynamic"]
    assert any(e[2] for e in runs["eager"][:-1])  # a row stopped at eos before the budget ran out


def test_static_decoder_is_reused_while_it_fits(gqa_model) -> None:  # noqa: ANN001
    first, second = random_prompts(300, [9, 30], seed=13)
    _, stats = generate(gqa_model, [first], 8, decoder="eager", return_stats=True)
    built = static_decoder(gqa_model, 1, 17, 3, _gate(gqa_model), "eager")
    assert stats.setup_s > 0 and built.max_len == CAPACITY_BUCKET
    tokens, stats = generate(gqa_model, [second], 8, decoder="eager", return_stats=True)
    assert stats.setup_s == 0.0 and static_decoder(gqa_model, 1, 38, 3, _gate(gqa_model), "eager") is built
    assert tokens == generate(gqa_model, [second], 8)  # the reused decoder starts clean
    assert static_decoder(gqa_model, 2, 38, 3, _gate(gqa_model), "eager") is not built  # another batch size
    rebuilt = static_decoder(gqa_model, 1, CAPACITY_BUCKET + 1, 3, _gate(gqa_model), "eager")
    assert rebuilt.max_len == 2 * CAPACITY_BUCKET
    gqa_model.to(torch.bfloat16)  # new weight tensors: a captured graph would read the old ones
    latest = static_decoder(gqa_model, 1, CAPACITY_BUCKET + 1, 3, _gate(gqa_model), "eager")
    assert latest is not rebuilt
    assert release_static_decoder(gqa_model) and not release_static_decoder(gqa_model)
    assert static_decoder(gqa_model, 1, CAPACITY_BUCKET + 1, 3, _gate(gqa_model), "eager") is not latest


def test_interleaved_generations_do_not_share_a_static_decoder(gqa_model) -> None:  # noqa: ANN001
    """Two streams on one model advanced in turns (or two threads) each get their own decoder
    state: the kept decoder serves one, the other gets one of its own. Afterwards the kept one
    is free again and reused."""
    first, second = random_prompts(300, [7, 5], seed=1)  # one batch size and capacity bucket: one key
    alone = [generate(gqa_model, [p], 10, eos_token_ids=[], decoder="eager")[0] for p in (first, second)]
    streams = [stream_generate(gqa_model, [p], 10, eos_token_ids=[], decoder="eager") for p in (first, second)]
    turns = [[], []]
    for a, b in zip(*streams):
        turns[0].append(a.tokens[0])
        turns[1].append(b.tokens[0])
    assert turns == alone
    kept = static_decoder(gqa_model, 1, 17, 3, _gate(gqa_model), "eager")
    assert not kept.in_use
    _, stats = generate(gqa_model, [first], 4, eos_token_ids=[], decoder="eager", return_stats=True)
    assert stats.setup_s == 0.0  # the kept decoder, not a new one


def _gate(model):  # noqa: ANN001, ANN202
    from looplm.exit import make_policy

    return make_policy(None, None, 3, model.config.early_exit_threshold, model.config.early_exit_step)


def _padded(model, lengths: list[int], seed: int):  # noqa: ANN001, ANN202
    from looplm.generate import prepare_inputs

    return prepare_inputs(random_prompts(model.config.vocab_size, lengths, seed=seed), None, 0)


@pytest.mark.parametrize(("attention", "fuse"), [("sdpa", True), ("matmul", False), ("matmul", True)])
def test_static_step_variants_give_generates_tokens(gqa_model, attention: str, fuse: bool) -> None:  # noqa: ANN001
    """Matmul attention (GQA without copying K/V) and q|k|v, gate|up as one GEMM each (eager):
    generate's tokens and exit steps on a GQA, left-padded batch at an early-exiting threshold,
    logits within fp32 rounding of the plain static step; the model is untouched."""
    from looplm.exit import make_policy

    ids, mask = _padded(gqa_model, [5, 19, 11], seed=1)
    weights = {name: t.clone() for name, t in gqa_model.state_dict().items()}
    expected, stats = generate(gqa_model, ids.tolist(), 14, attention_mask=mask, eos_token_ids=[], exit_threshold=0.5,
                               return_stats=True)
    plain = decode_greedily(StaticDecoder(gqa_model, 3, 40, policy=make_policy(None, 0.5, 3, None)), ids, mask, 14)
    variant = decode_greedily(StaticDecoder(gqa_model, 3, 40, policy=make_policy(None, 0.5, 3, None), attention=attention,
                                    fuse_projections=fuse), ids, mask, 14)
    assert variant[0] == plain[0] == expected
    assert variant[1] == plain[1] == stats.steps_per_token
    assert torch.allclose(variant[2], plain[2], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(t, weights[name]) for name, t in gqa_model.state_dict().items())


def test_static_options_are_checked(gqa_model) -> None:  # noqa: ANN001
    for mode in ("eager", "compile"):  # flex: CUDA and a compile mode only
        with pytest.raises(GenerationError, match="CUDA models in a compile mode"):
            StaticDecoder(gqa_model, 1, 8, mode=mode, attention="flex")
    with pytest.raises(GenerationError, match="unknown static attention"):
        StaticDecoder(gqa_model, 1, 8, attention="paged")
    from looplm.quant import quantize_model

    with pytest.raises(GenerationError, match="plain unbiased nn.Linear"):
        StaticDecoder(quantize_model(gqa_model, bits=8), 1, 8, fuse_projections=True)


def test_flex_attention_over_valid_keys_equals_sdpa() -> None:
    """The compiled FlexAttention path (what `attention='flex'` runs on a GPU) against SDPA over
    the repeated K/V heads, on CPU at head_dim 32 and 64."""
    from looplm.models.ouro import AttentionBias
    from looplm.static_decode import flex_attention_over_valid_keys

    generator = torch.Generator().manual_seed(0)
    for heads, kv_heads, length, dim in [(4, 2, 40, 32), (4, 4, 100, 64)]:
        torch._dynamo.reset()
        q = torch.randn(3, heads, 1, dim, generator=generator)
        keys, values = (torch.randn(3, kv_heads, length, dim, generator=generator) for _ in range(2))
        valid = torch.rand(3, length, generator=generator) > 0.4
        valid[:, -1] = True  # the token's own key
        valid[0, :30] = False  # left padding
        mask = valid[:, None, None, :]
        flex = torch.compile(flex_attention_over_valid_keys, fullgraph=True, dynamic=False)
        out = flex(q, keys, values, AttentionBias(mask, is_causal=False))
        groups = heads // kv_heads
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1), attn_mask=mask)
        assert torch.allclose(out, expected, atol=1e-5), float((out - expected).abs().max())


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_compiled_fused_projections_match_generate(gqa_model, attention: str) -> None:  # noqa: ANN001
    """Compiled fused layer passes on CPU, with either attention: generate's tokens and exit
    steps at an early-exiting threshold, with one compiled graph for all slots."""
    from torch._dynamo.utils import counters

    from looplm.exit import make_policy

    ids, mask = _padded(gqa_model, [5, 19, 11], seed=1)
    expected, stats = generate(gqa_model, ids.tolist(), 12, attention_mask=mask, eos_token_ids=[], exit_threshold=0.5,
                               return_stats=True)
    torch._dynamo.reset()
    counters.clear()
    decoder = StaticDecoder(gqa_model, 3, 40, policy=make_policy(None, 0.5, 3, None), mode="compile",
                            attention=attention, fuse_projections=True)
    tokens, exits, _ = decode_greedily(decoder, ids, mask, 12)
    assert tokens == expected and exits == stats.steps_per_token
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_settings_merge_inductor_options_into_the_mode() -> None:
    from looplm.static_decode import compile_settings

    assert compile_settings("default", None) == {"mode": "default"}
    assert compile_settings("default", {"coordinate_descent_tuning": True}) == {
        "options": {"coordinate_descent_tuning": True}}
    merged = compile_settings("max-autotune-no-cudagraphs", {"coordinate_descent_tuning": False})["options"]
    assert merged["max_autotune"] is True and merged["coordinate_descent_tuning"] is False
    with pytest.raises(GenerationError, match="unknown Inductor option"):
        compile_settings("default", {"coordinate_descent_tunning": True})
    with pytest.raises(GenerationError, match="Unrecognized mode"):
        compile_settings("fastest", {"coordinate_descent_tuning": True})


def test_compiled_step_with_inductor_options_matches_generate(gqa_model, monkeypatch) -> None:  # noqa: ANN001
    """`compile_options` reach torch.compile (as options, without the mode) and the compiled step
    still gives generate's tokens. (On CPU coordinate descent has no Triton kernel to tune: what it
    changes on a GPU is measured by the GPU benchmark, not here.)"""
    from looplm.exit import make_policy

    seen: list[dict] = []
    real_compile = torch.compile

    def spy(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(kwargs)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    ids, mask = _padded(gqa_model, [7, 3], seed=4)
    expected = generate(gqa_model, ids.tolist(), 8, attention_mask=mask, eos_token_ids=[], exit_threshold=0.5)
    torch._dynamo.reset()
    decoder = StaticDecoder(gqa_model, 2, 24, policy=make_policy(None, 0.5, 3, None), mode="compile",
                            compile_options={"coordinate_descent_tuning": True})
    tokens, _, _ = decode_greedily(decoder, ids, mask, 8)
    assert tokens == expected
    assert seen == [{"fullgraph": True, "dynamic": False, "options": {"coordinate_descent_tuning": True}}]
