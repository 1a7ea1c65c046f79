"""The static-shape decode step gives the same tokens and exit steps as the normal generate path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import random_prompts

import looplm
from looplm.errors import GenerationError
from looplm.generate import generate, resolve_decoder, stream_generate
from looplm.static_decode import CAPACITY_BUCKET, StaticDecoder, generate_static, static_decoder


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


@pytest.mark.slow
def test_compiled_step_matches_generate(gqa_model) -> None:  # noqa: ANN001
    """torch.compile(fullgraph=True, dynamic=False) of the layer pass on CPU (about 30 s on 2
    cores): generate's tokens, and ONE compiled graph for all 6 (step, layer) slots."""
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
    assert static_decoder(gqa_model, 1, CAPACITY_BUCKET + 1, 3, _gate(gqa_model), "eager") is not rebuilt


def _gate(model):  # noqa: ANN001, ANN202
    from looplm.exit import make_policy

    return make_policy(None, None, 3, model.config.early_exit_threshold, model.config.early_exit_step)
