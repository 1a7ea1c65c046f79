"""Generation invariants on random models of several shapes (GQA, other step counts, padding)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

import looplm
from looplm.errors import ConfigError, GenerationError


@pytest.fixture
def gqa_model(make_checkpoint):  # noqa: ANN001, ANN201
    path = make_checkpoint(seed=3, num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3, rope_theta=5e5)
    return looplm.load(path, dtype="float32")


def test_cache_matches_no_cache(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [17])[0]
    cached = gqa_model.generate(prompt, 20, use_cache=True, eos_token_ids=[])
    recomputed = gqa_model.generate(prompt, 20, use_cache=False, eos_token_ids=[])
    assert cached == recomputed
    assert len(cached[0]) == 20


def test_cache_matches_no_cache_with_threshold(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [9], seed=5)[0]
    a = gqa_model.generate(prompt, 16, exit_threshold=0.4, eos_token_ids=[])
    b = gqa_model.generate(prompt, 16, exit_threshold=0.4, use_cache=False, eos_token_ids=[])
    assert a == b


def test_batched_left_padding_equals_solo(gqa_model) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [5, 19, 11], seed=1)
    batched = gqa_model.generate(prompts, 12, eos_token_ids=[])
    solo = [gqa_model.generate(p, 12, eos_token_ids=[])[0] for p in prompts]
    assert batched == solo


def test_batched_no_cache_left_padding_equals_solo(gqa_model) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [4, 10], seed=2)
    batched = gqa_model.generate(prompts, 6, use_cache=False, exit_threshold=0.5, eos_token_ids=[])
    solo = [gqa_model.generate(p, 6, use_cache=False, exit_threshold=0.5, eos_token_ids=[])[0] for p in prompts]
    assert batched == solo


def test_left_padded_forward_matches_unpadded(gqa_model) -> None:  # noqa: ANN001
    short, long = random_prompts(300, [6, 14], seed=4)
    ids = torch.tensor([[0] * 8 + short, long])
    mask = torch.tensor([[0] * 8 + [1] * 6, [1] * 14])
    with torch.inference_mode():
        padded = gqa_model.forward_steps(ids, attention_mask=mask)
        alone = gqa_model.forward_steps(torch.tensor([short]))
    assert torch.allclose(padded.logits[:, 0, 8:], alone.logits[:, 0], atol=1e-4)
    assert torch.allclose(padded.exit_probs[:, 0, 8:], alone.exit_probs[:, 0], atol=1e-5)
    assert torch.isfinite(padded.logits).all()


def test_explicit_attention_mask_equals_auto_padding(gqa_model) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [3, 8], seed=6)
    ids = torch.tensor([[0] * 5 + prompts[0], prompts[1]])
    mask = torch.tensor([[0] * 5 + [1] * 3, [1] * 8])
    assert gqa_model.generate(ids, 5, attention_mask=mask, eos_token_ids=[]) == gqa_model.generate(
        prompts, 5, eos_token_ids=[]
    )


def test_one_step_is_stack_once_norm_lm_head(make_checkpoint) -> None:  # noqa: ANN001
    model = looplm.load(make_checkpoint(seed=2), dtype="float32")
    ids = torch.tensor(random_prompts(300, [10], seed=7))
    with torch.inference_mode():
        out = model.forward_steps(ids, steps=1)
        four = model.forward_steps(ids, steps=4)
    assert out.logits.shape[0] == 1
    assert torch.allclose(out.exit_probs, torch.ones_like(out.exit_probs))
    # the first of four steps is the same computation as a single step
    assert torch.allclose(four.logits[0], out.logits[0], atol=1e-5)
    assert not torch.allclose(four.logits[3], out.logits[0], atol=1e-2)


def test_steps_change_kv_slots(make_checkpoint) -> None:  # noqa: ANN001
    model = looplm.load(make_checkpoint(), dtype="float32", steps=3)
    assert model.config.total_ut_steps == 3
    assert model.make_cache(1, 8).num_slots == 3 * 2
    with pytest.warns(UserWarning):
        assert model.make_cache(1, 8, steps=6).num_slots == 12
        model.forward_steps(torch.tensor([[5, 6]]), steps=6)
    with pytest.raises(ConfigError):
        model.forward_steps(torch.tensor([[5, 6]]), steps=9)


def test_a_checkpoint_with_more_than_8_steps_may_use_all_of_them(make_checkpoint) -> None:  # noqa: ANN001
    """8 bounds overrides, not a checkpoint's own count: a 10-step model runs 10 and may ask for 9."""
    from looplm.server.engine import Engine

    model = looplm.load(make_checkpoint(total_ut_steps=10), dtype="float32")
    assert model.config.total_ut_steps == 10 and model.make_cache(1, 8).num_slots == 10 * 2
    prompt = random_prompts(300, [6])[0]
    full = model.generate(prompt, 4, eos_token_ids=[], exit_policy="last")
    assert model.generate(prompt, 4, eos_token_ids=[], exit_policy="last", use_cache=False) == full
    with pytest.warns(UserWarning, match="outside the trained range"):
        assert model.forward_steps(torch.tensor([prompt]), steps=9).logits.shape[0] == 9
    with pytest.raises(ConfigError, match="from 1 to 10, got 11"):
        model.forward_steps(torch.tensor([prompt]), steps=11)
    engine = Engine(model, max_context=64)
    assert engine.loop_config().steps == 10 and engine.loop_config(9).steps == 9
    with pytest.raises(GenerationError, match=r"loops must be in \[1, 10\], got 11"):
        engine.loop_config(11)


def test_exit_logits_of_one_position_equal_that_column(gqa_model) -> None:  # noqa: ANN001
    with torch.inference_mode():
        out = gqa_model.forward_steps(torch.tensor([random_prompts(300, [7], seed=3)[0]]))
        every, steps = gqa_model.exit_logits(out, 0.5)
        for position in (0, 3, 6, -1, -7):
            logits, step = gqa_model.exit_logits(out, 0.5, position=position)
            assert logits.shape[1] == 1 and torch.equal(step[:, 0], steps[:, position])
            assert torch.allclose(logits[:, 0], every[:, position], atol=1e-6)


def test_threshold_that_never_fires_equals_last_step(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [8], seed=8)[0]
    default = gqa_model.generate(prompt, 10, eos_token_ids=[])
    with torch.inference_mode():
        out = gqa_model.forward_steps(torch.tensor([prompt]))
        logits, steps = gqa_model.exit_logits(out, 1.0)
    assert (steps == out.logits.shape[0] - 1).all()  # fp32: 1.0 is never reached early
    assert torch.equal(logits, out.logits[-1])
    # greedy default generation == argmax of last-step logits, recomputed by hand
    ids = list(prompt)
    for _ in range(10):
        with torch.inference_mode():
            ids.append(int(gqa_model.forward_steps(torch.tensor([ids])).logits[-1, 0, -1].argmax()))
    assert default[0] == ids[len(prompt):]


def test_saturated_gate_exits_early_in_bf16_at_threshold_one(make_checkpoint) -> None:  # noqa: ANN001
    """Reference rule: the exit CDF is summed in the model dtype, so 1.0 can be reached before the
    last step in bf16 when gates saturate, but not in fp32 (spec 5.3)."""
    path = make_checkpoint(seed=4)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    weights["model.early_exit_gate.bias"] = torch.full((1,), 5.0, dtype=torch.bfloat16)  # lambda ~ 0.993
    weights["model.early_exit_gate.weight"].zero_()
    save_file(weights, str(path / "model.safetensors"))
    ids = torch.tensor(random_prompts(300, [6], seed=9))
    # bf16: lambda rounds to 0.9922, so the CDF after two steps is 0.99994, which rounds to 1.0.
    # fp32: survival after three steps is 3e-7, so the sum stays below 1.0 until the last step.
    for dtype, expected_step in (("bfloat16", 1), ("float32", 3)):
        model = looplm.load(path, dtype=dtype)
        with torch.inference_mode():
            out = model.forward_steps(ids)
            _, steps = model.exit_logits(out)
        assert (steps == expected_step).all(), dtype


def test_sampling_is_reproducible_with_seed(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [5])[0]
    a = gqa_model.generate(prompt, 12, temperature=1.0, top_p=0.9, top_k=50, seed=123, eos_token_ids=[])
    b = gqa_model.generate(prompt, 12, temperature=1.0, top_p=0.9, top_k=50, seed=123, eos_token_ids=[])
    c = gqa_model.generate(prompt, 12, temperature=1.0, seed=7, eos_token_ids=[])
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [5])[0]
    greedy = gqa_model.generate(prompt, 8, eos_token_ids=[])
    assert gqa_model.generate(prompt, 8, temperature=0.7, top_k=1, seed=3, eos_token_ids=[]) == greedy


def test_stops_on_every_eos_id(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [5])[0]
    free = gqa_model.generate(prompt, 10, eos_token_ids=[])[0]
    stop_at = free[3]
    stopped = gqa_model.generate(prompt, 10, eos_token_ids=[9999, stop_at])[0]
    assert stopped == free[: free.index(stop_at) + 1]


def test_stop_string(make_checkpoint) -> None:  # noqa: ANN001
    model = looplm.load(make_checkpoint(seed=1, vocab_size=259), dtype="float32")
    prompt = model.tokenizer.encode("abc")
    free = model.generate(prompt, 12, eos_token_ids=[])[0]
    text = model.tokenizer.decode(free[:6])
    needle = text[-2:] if len(text) >= 2 else text
    stopped = model.generate(prompt, 12, stop=[needle], eos_token_ids=[])[0]
    assert len(stopped) <= 6 and needle in model.tokenizer.decode(stopped, skip_special_tokens=False)


def test_direct_calls_refuse_sequences_longer_than_the_context(gqa_model) -> None:  # noqa: ANN001
    """forward_steps, step_logprobs and calling the model refuse what generate refuses."""
    context = gqa_model.config.max_position_embeddings
    fits, too_long = torch.zeros(1, context, dtype=torch.long), torch.zeros(1, context + 1, dtype=torch.long)
    with torch.inference_mode():
        assert gqa_model.forward_steps(fits, with_logits=False).hidden_states.shape[2] == context
        for call in (lambda ids: gqa_model.forward_steps(ids), lambda ids: gqa_model(ids),
                     lambda ids: gqa_model.step_logprobs(ids, ids)):
            with pytest.raises(GenerationError, match=f"exceeds the context of {context} tokens"):
                call(too_long)


def test_a_stop_string_of_many_byte_tokens_is_found() -> None:
    """The embedded model's BPE spells a CJK character as 3 byte tokens: a 5-character stop
    string is 15 tokens, which a window of characters + 8 tokens never held whole."""
    from looplm.generate import hits_stop

    model = looplm.load(None, dtype="float32")
    stop = "最终答案是"
    tokens = model.tokenizer.encode("思考。" + stop)
    assert len(model.tokenizer.encode(stop)) > len(stop) + 8  # the case the window must cover
    assert hits_stop(model, tokens, [stop])
    assert hits_stop(model, tokens + model.tokenizer.encode("🙂🙂"), ["是🙂🙂"])
    assert not hits_stop(model, tokens[:-1], [stop])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_k": -2},
        {"exit_threshold": 1.5},
        {"max_new_tokens": 300},  # prompt + new tokens > max_position_embeddings (256)
    ],
)
def test_bad_generation_arguments(gqa_model, kwargs) -> None:  # noqa: ANN001
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(GenerationError):
        gqa_model.generate([5, 6, 7], **args)


def test_bad_prompts(gqa_model) -> None:  # noqa: ANN001
    with pytest.raises(GenerationError):
        gqa_model.generate([], 4)
    with pytest.raises(GenerationError):
        gqa_model.generate([5, 100000], 4)
    with pytest.raises(GenerationError):  # right padding is rejected, not silently mis-positioned
        gqa_model.generate(torch.tensor([[5, 6, 0]]), 4, attention_mask=torch.tensor([[1, 1, 0]]))


@pytest.mark.parametrize(
    ("input_ids", "message"),
    [
        ("hello", "not text"),
        (torch.tensor([[5.0, 6.7]]), "integer token ids, got a float32 tensor"),  # never truncated silently
        (torch.zeros(1, 1, 3, dtype=torch.long), "shape .* got \\[1, 1, 3\\]"),
        (torch.tensor(5), "shape .* got \\[\\]"),
        ([5.0, 6.0], "one list of ints"),
        ([True, False], "one list of ints"),
        ([[5, 6], 7], "one list of ints"),
        (["hi"], "one list of ints"),
        ([[5], []], "at least one token"),
        ({"seed": "x", "input_ids": [5, 6]}, "seed must be an integer"),
        ({"seed": 2**64, "input_ids": [5, 6]}, "seed must fit in 64 bits"),
    ],
)
def test_malformed_inputs_are_generation_errors(gqa_model, input_ids, message: str) -> None:  # noqa: ANN001
    kwargs = dict(input_ids) if isinstance(input_ids, dict) else {"input_ids": input_ids}
    with pytest.raises(GenerationError, match=message):
        gqa_model.generate(max_new_tokens=3, temperature=1.0, **kwargs)


def test_prompts_as_numpy_tensors_and_tuples_give_the_same_tokens(gqa_model) -> None:  # noqa: ANN001
    import numpy as np

    expected = gqa_model.generate([[5, 6, 7], [8, 9]], 4)
    forms = [np.array([5, 6, 7]), (5, 6, 7), [np.int64(5), np.int64(6), np.int64(7)],
             torch.tensor([5, 6, 7], dtype=torch.int32)]
    for form in forms:
        assert gqa_model.generate(form, 4) == expected[:1]
    assert gqa_model.generate([torch.tensor([5, 6, 7]), (8, 9)], 4) == expected


def test_forward_steps_checks_token_ids(gqa_model) -> None:  # noqa: ANN001
    with pytest.raises(GenerationError, match="integer token ids"):
        gqa_model.forward_steps(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(GenerationError, match="token ids must be in"):
        gqa_model.forward_steps(torch.tensor([[1, gqa_model.config.vocab_size]]))


def test_stream_generate_keeps_callers_autograd_state(gqa_model) -> None:  # noqa: ANN001
    from looplm.generate import GenerationStats, stream_generate

    stats = GenerationStats()
    events = list(stream_generate(gqa_model, [5, 6, 7], 4, eos_token_ids=[], stats=stats))
    for _ in stream_generate(gqa_model, [5, 6, 7], 3, eos_token_ids=[]):
        assert not torch.is_inference_mode_enabled()
    assert [e.index for e in events] == [0, 1, 2, 3]
    assert stats.new_tokens == 4 and stats.prompt_tokens == 3 and stats.decode_tok_s > 0
    assert all(1 <= step <= 3 for e in events for step in e.exit_steps.values())


def test_step_logprobs_match_logits_and_are_differentiable(gqa_model) -> None:  # noqa: ANN001
    ids = torch.tensor(random_prompts(300, [9, 9], seed=11))
    targets = torch.roll(ids, -1, dims=1)
    logprobs = gqa_model.step_logprobs(ids, targets)
    assert logprobs.shape == (3, 2, 9) and logprobs.requires_grad
    with torch.inference_mode():
        logits = gqa_model.forward_steps(ids).logits
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets.expand(3, 2, 9).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs.detach(), expected, atol=1e-5)
    logprobs[-1].sum().backward()
    grad = gqa_model.model.layers[0].mlp.up_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert gqa_model.model.early_exit_gate.weight.grad is None  # log-probs do not touch the gate
    gqa_model.zero_grad(set_to_none=True)
    with pytest.raises(GenerationError, match="one target per input position"):  # gather would truncate
        gqa_model.step_logprobs(ids, targets[:, :-1])
    with pytest.raises(GenerationError, match="token ids must be in"):
        gqa_model.step_logprobs(ids, targets + gqa_model.config.vocab_size)


def test_a_single_eos_id_may_be_an_int(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [6], seed=2)[0]
    free = gqa_model.generate(prompt, 8, eos_token_ids=[])[0]
    assert gqa_model.generate(prompt, 8, eos_token_ids=free[2]) == gqa_model.generate(prompt, 8, eos_token_ids=[free[2]])
    assert gqa_model.generate(prompt, 8, eos_token_ids=free[2])[0] == free[: free.index(free[2]) + 1]


def _reference_adjusted_greedy(model, prompt: list[int], new: int, presence: float, frequency: float,  # noqa: ANN001
                               bias: dict[int, float], repetition: float = 1.0) -> list[int]:
    """Greedy decoding at the last loop, recomputing the whole sequence, with the rules written out
    in vLLM's order: logit + bias; then a token seen in the prompt or output divided by `repetition`
    if positive, else multiplied; then - count x frequency - (count > 0) x presence, counts over
    generated tokens."""
    ids, produced = list(prompt), []
    for _ in range(new):
        with torch.inference_mode():
            logits = model.forward_steps(torch.tensor([ids])).logits[-1, 0, -1]
        logits = logits.clone()  # a normal tensor, to edit in place
        for token, value in bias.items():
            logits[token] += value
        for token in set(ids):
            logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token in set(produced):
            logits[token] -= produced.count(token) * frequency + presence
        produced.append(int(logits.argmax()))
        ids.append(produced[-1])
    return produced


@pytest.mark.parametrize("decoder", ["dynamic", "eager"])
def test_penalties_and_logit_bias_follow_openais_rule(gqa_model, decoder: str) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [5, 9], seed=4)
    free = gqa_model.generate(prompts[0], 12, exit_policy="last", eos_token_ids=[])[0]
    assert len(set(free)) < len(free)  # the greedy text repeats itself, so the penalties have work to do
    bias = {free[1]: -100.0, 17: 1.5}
    settings = {"presence_penalty": 0.4, "frequency_penalty": 0.7, "logit_bias": bias}
    expected = [_reference_adjusted_greedy(gqa_model, p, 12, 0.4, 0.7, bias) for p in prompts]
    assert expected[0] != free and free[1] not in expected[0]
    batched = gqa_model.generate(prompts, 12, exit_policy="last", eos_token_ids=[], decoder=decoder, **settings)
    assert batched == expected  # each row counts its own tokens
    no_cache = gqa_model.generate(prompts[1], 12, exit_policy="last", eos_token_ids=[], use_cache=False, **settings)
    assert no_cache[0] == expected[1]
    forced = gqa_model.generate(prompts[0], 4, eos_token_ids=[], logit_bias={"42": 100})[0]
    assert forced == [42, 42, 42, 42]  # string keys, as JSON sends them
    settings["repetition_penalty"] = 1.3
    expected = [_reference_adjusted_greedy(gqa_model, p, 12, 0.4, 0.7, bias, 1.3) for p in prompts]
    batched = gqa_model.generate(prompts, 12, exit_policy="last", eos_token_ids=[], decoder=decoder, **settings)
    assert batched == expected


def test_repetition_penalty_counts_the_prompt_but_not_its_padding() -> None:
    from looplm.sampling import SamplingParams, TokenChooser

    prompt = torch.tensor([[0, 0, 7, 9], [3, 0, 5, 5]])  # row 0 is left-padded with id 0; row 1 has a real 0
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    choose = TokenChooser(SamplingParams(repetition_penalty=2.0), None, prompt, mask)
    logits = torch.full((2, 12), 1.0)
    logits[:, 11] = 1.9  # unseen: wins once every seen token is halved
    logits[:, 0] = 2.0  # seen in row 1 only: 1.0 there (halved), still 2.0 in row 0
    assert choose(logits).tolist() == [0, 11]
    assert choose.seen[0].nonzero().flatten().tolist() == [0, 7, 9]  # the chosen 0 counts from now on
    assert choose.seen[1].nonzero().flatten().tolist() == [0, 3, 5, 11]


def test_min_p_keeps_tokens_near_the_likeliest() -> None:
    from looplm.sampling import SamplingParams, probabilities

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = probabilities(logits, SamplingParams(temperature=1.0, min_p=0.2))  # keeps p >= 0.1
    assert torch.allclose(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    assert torch.equal(probabilities(logits, SamplingParams(temperature=1.0, min_p=1.0)),
                       torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("params", [
    {"temperature": 1e-38}, {"temperature": 5e-324}, {"temperature": 1e-6},  # greedy below 1e-5
    {"temperature": 0.7, "top_p": 1e-46},  # 0 in fp32: the likeliest token is still kept
    {"temperature": 0.7, "repetition_penalty": 1e-300},  # a seen token's logit / 1e-300 is inf
    {"temperature": 2e-5, "repetition_penalty": 1e300},
])
def test_extreme_but_valid_sampling_settings_give_a_token(params: dict) -> None:
    """Every value the validation accepts must sample: NaN probabilities made torch.multinomial
    raise (and, in the server, fail the request's whole decode batch)."""
    from looplm.sampling import SamplingParams, TokenChooser

    logits = torch.tensor([[2.0, 7.5, -1.0, 7.0, float("-inf")], [0.1, 0.2, 30.0, -30.0, 0.0]])
    chooser = TokenChooser(SamplingParams(**params), torch.Generator().manual_seed(0),
                           prompt=torch.tensor([[1, 0], [2, 2]]))
    tokens = chooser(logits)
    assert tokens.shape == (2,) and bool((tokens >= 0).all() and (tokens < 4).all())
    if params.get("temperature", 1) < 1e-5 or params.get("top_p", 1) < 1e-30:
        assert tokens.tolist() == [1, 2]  # the likeliest token of each row


@pytest.mark.parametrize("params", [{}, {"temperature": 0.7}, {"repetition_penalty": 1.2},
                                    {"temperature": 0.7, "presence_penalty": 1.0}])
def test_nan_or_infinite_logits_are_a_generation_error(params: dict) -> None:
    """Corrupt weights give NaN logits: greedy picked an arbitrary token from them and sampling
    failed with torch.multinomial's traceback. A -inf logit alone (a token ruled out) is fine."""
    from looplm.sampling import BAD_LOGITS, SamplingParams, TokenChooser, sample

    sampling = SamplingParams(**params)
    fine = torch.tensor([[1.0, 5.0, float("-inf")], [4.0, 0.0, 1.0]])
    assert TokenChooser(sampling, torch.Generator().manual_seed(0))(fine).shape == (2,)
    for bad in (float("nan"), float("inf")):
        logits = fine.clone()
        logits[1, 1] = bad
        with pytest.raises(GenerationError, match=BAD_LOGITS):
            TokenChooser(sampling, torch.Generator().manual_seed(0))(logits)
        with pytest.raises(GenerationError, match=BAD_LOGITS):
            sample(logits, sampling, torch.Generator().manual_seed(0))
    with pytest.raises(GenerationError, match=BAD_LOGITS):
        sample(torch.full((1, 3), float("-inf")), sampling)


def test_a_model_with_nan_weights_fails_generation_in_one_line(make_checkpoint) -> None:  # noqa: ANN001
    model = looplm.load(make_checkpoint(seed=3, total_ut_steps=3), dtype="float32")
    with torch.no_grad():
        model.model.embed_tokens.weight[3:] = float("nan")
    prompt = random_prompts(300, [5])[0]
    for kwargs in ({}, {"temperature": 0.7}, {"draft_steps": 1}, {"draft_steps": 1, "temperature": 0.7}):
        with pytest.raises(GenerationError, match="logits are NaN or infinite"):
            model.generate(prompt, 4, eos_token_ids=[], **kwargs)


def test_speculative_verification_refuses_nan_logits() -> None:
    """The draft's loops can be fine while the full model's deeper ones blow up."""
    from looplm.sampling import SamplingParams
    from looplm.speculative import accept_drafts

    drafts = torch.tensor([[1, 2]])
    target = [torch.tensor([[0.0, 9.0, 0.0]]), torch.tensor([[0.0, float("nan"), 9.0]])]
    for sampling, draft_probs in ((SamplingParams(), []), (SamplingParams(temperature=0.7), [torch.full((1, 3), 1 / 3)] * 2)):
        with pytest.raises(GenerationError, match="logits are NaN or infinite"):
            accept_drafts(drafts, draft_probs, target, sampling, torch.Generator().manual_seed(0))


def test_seeds_differ_in_their_high_32_bits_too(gqa_model) -> None:  # noqa: ANN001
    """torch's CPU generator keeps a seed's low 32 bits: 1 and 1 + 2**32 sampled the same tokens."""
    from looplm.sampling import make_generator

    prompt = random_prompts(300, [5])[0]
    runs = {seed: gqa_model.generate(prompt, 16, temperature=1.0, seed=seed, eos_token_ids=[])[0]
            for seed in (1, 1 + 2**32, -1, 2**63 - 1)}
    assert len({tuple(tokens) for tokens in runs.values()}) == 4
    assert runs[1] == gqa_model.generate(prompt, 16, temperature=1.0, seed=1, eos_token_ids=[])[0]
    plain = torch.Generator().manual_seed(12345)  # seeds below 2**32 draw what torch's own seeding does
    assert torch.equal(torch.rand(4, generator=make_generator(12345, False, torch.device("cpu"))),
                       torch.rand(4, generator=plain))


def test_one_threshold_rule_per_exit_policy_everywhere(gqa_model) -> None:  # noqa: ANN001
    """generate, the server and the CLI disagreed: kl above 1 passed here and not there,
    confidence 0 was refused as if it were the gate, a threshold for `last` was ignored."""
    from looplm.server.engine import Engine

    engine = Engine(gqa_model, max_context=64)
    for policy, threshold in (("kl", 2.5), ("kl", 0.0), ("confidence", 0.0), ("confidence", 1.0), ("gate", 1.0),
                              (None, 0.3)):
        gqa_model.generate([5, 6, 7], 2, exit_policy=policy, exit_threshold=threshold)
        engine.loop_config(None, policy, threshold)
    for policy, threshold, needle in (("last", 0.5, "reads no threshold"), ("weighted", 0.5, "reads no threshold"),
                                      ("gate", 0.0, r"in \(0, 1\]"), ("confidence", 1.5, r"in \[0, 1\]"),
                                      ("kl", -0.1, ">= 0"), (None, 2.0, r"in \(0, 1\]")):
        with pytest.raises(GenerationError, match=needle):
            gqa_model.generate([5, 6, 7], 2, exit_policy=policy, exit_threshold=threshold)
        with pytest.raises(GenerationError, match=needle):
            engine.loop_config(None, policy, threshold)


def test_cache_options_without_a_cache_are_refused(gqa_model) -> None:  # noqa: ANN001
    for kwargs, needle in (({"kv_mode": "shared"}, "kv_mode='shared' needs the KV cache"),
                           ({"skip_compute": True}, "skip_compute needs the KV cache"),
                           ({"kv_mode": "shared", "skip_compute": True}, "kv_mode='shared' and skip_compute")):
        with pytest.raises(GenerationError, match=needle):
            gqa_model.generate([5, 6, 7], 2, use_cache=False, **kwargs)


def test_an_empty_stop_string_is_refused(gqa_model) -> None:  # noqa: ANN001
    """"" is in every text: generation stopped after one token."""
    gqa_model.tokenizer = looplm.load().tokenizer
    for stop in ([""], "", ["ok", ""]):
        with pytest.raises(GenerationError, match="stop strings must be non-empty strings"):
            gqa_model.generate([5, 6, 7], 4, stop=stop)


def test_probabilities_are_shift_invariant_and_finite() -> None:
    from looplm.sampling import SamplingParams, probabilities

    logits = torch.tensor([[1.0, 2.0, 3.0, float("-inf")]])
    params = SamplingParams(temperature=0.5)
    expected = torch.softmax(logits / 0.5, dim=-1)
    assert torch.allclose(probabilities(logits, params), expected)
    assert torch.allclose(probabilities(logits + 100.0, params), expected)
    # Logits near the fp32 limit overflowed when divided by the temperature before the shift.
    assert torch.equal(probabilities(torch.tensor([[3e38, 2.9e38, 0.0]]), params), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.equal(probabilities(torch.tensor([[float("inf"), 1.0, 0.0]]), params),
                       torch.tensor([[1.0, 0.0, 0.0]]))


def test_min_p_one_samples_the_greedy_tokens(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [6])[0]
    greedy = gqa_model.generate(prompt, 10, eos_token_ids=[])
    assert gqa_model.generate(prompt, 10, eos_token_ids=[], temperature=1.5, min_p=1.0, seed=4) == greedy


def test_sampling_with_penalties_is_reproducible_and_differs(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [5])[0]
    args = {"temperature": 1.0, "seed": 5, "eos_token_ids": []}
    plain = gqa_model.generate(prompt, 16, **args)[0]
    # A random model's logits are nearly flat: a negative penalty (a bonus) makes it repeat itself.
    repeating = gqa_model.generate(prompt, 16, frequency_penalty=-2.0, **args)[0]
    assert repeating == gqa_model.generate(prompt, 16, frequency_penalty=-2.0, **args)[0]
    assert len(set(repeating)) < len(set(plain))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"logit_bias": {7: 150}}, r"values in \[-100, 100\], got 7: 150"),
    ({"logit_bias": {"seven": 1}}, "logit_bias keys must be token ids"),
    ({"logit_bias": [(7, 1)]}, "logit_bias must map token ids to values"),
    ({"logit_bias": {300: 1}}, r"logit_bias token id 300 is outside the vocabulary \(0..299\)"),
    ({"frequency_penalty": 0.5, "draft_steps": 1}, "cannot take penalties or logit_bias"),
    ({"repetition_penalty": 1.1, "draft_steps": 1}, "cannot take penalties or logit_bias"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be a finite number > 0 \(1 = off\), got 0.0"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
])
def test_bad_penalties_and_bias(gqa_model, kwargs: dict, needle: str) -> None:  # noqa: ANN001
    with pytest.raises(GenerationError, match=needle):
        gqa_model.generate([5, 6, 7], 4, **kwargs)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"temperature": NAN}, "temperature"), ({"temperature": INF}, "temperature"), ({"top_p": NAN}, "top_p"),
    ({"min_p": NAN}, "min_p"), ({"presence_penalty": NAN}, "presence_penalty"),
    ({"frequency_penalty": -INF}, "frequency_penalty"), ({"repetition_penalty": NAN}, "repetition_penalty"),
    ({"repetition_penalty": INF}, "repetition_penalty"), ({"logit_bias": ((7, NAN),)}, "logit_bias"),
])
def test_sampling_values_must_be_finite(kwargs: dict, name: str) -> None:
    """NaN passed every `<` check, then made torch.multinomial raise mid-generation."""
    from looplm.sampling import SamplingParams

    with pytest.raises(GenerationError, match=f"^{name} "):
        SamplingParams(**kwargs)


def test_generation_never_reads_a_cache_position_before_writing_it(make_checkpoint, monkeypatch) -> None:  # noqa: ANN001
    """`generate` and the chat's PromptCache take unzeroed cache buffers (`zeroed=False`). Poisoned
    with NaN instead, every read of a position not yet written (even one masked to weight 0: 0 x
    NaN is NaN) would change the tokens; so the results must equal those of zeroed buffers, in the
    cases that write unevenly: left padding, rows that stop at eos, early exit with real skipping
    (fill_skipped), the shared KV mode, a conversation's cache carried over, and looplm's bf16
    C++ decode kernels."""
    import looplm.cache
    from looplm.default_model import default_model_dir
    from looplm.prompt_cache import PromptCache

    real_allocate = looplm.cache.allocate

    def poisoned(shape, dtype, device, zeroed: bool) -> torch.Tensor:  # noqa: ANN001
        return real_allocate(shape, dtype, device, True) if zeroed else torch.full(shape, float("nan"), dtype=dtype)

    def zero_everything(shape, dtype, device, zeroed: bool) -> torch.Tensor:  # noqa: ANN001
        return real_allocate(shape, dtype, device, True)

    fp32 = looplm.load(make_checkpoint(seed=5, num_attention_heads=4, num_key_value_heads=2), dtype="float32")
    bf16 = looplm.load(default_model_dir(), dtype="bfloat16")
    assert bf16.kernels is not None and bf16.kernels["decode_plans"] > 0  # the C++ layer pass runs
    padded = random_prompts(300, [3, 9, 6], seed=4)
    greedy = dict(temperature=0.0, return_stats=True)
    eos_row = fp32.generate(padded[:1], 6, eos_token_ids=[], temperature=0.0)[0][3]  # row 0 stops at its 4th token
    cases = [
        (fp32, dict(eos_token_ids=[])),
        (fp32, dict(eos_token_ids=[eos_row])),
        (fp32, dict(eos_token_ids=[], exit_policy="gate", exit_threshold=0.5, skip_compute=True)),
        (fp32, dict(eos_token_ids=[], kv_mode="shared")),
        (bf16, dict(eos_token_ids=[])),
        (bf16, dict(eos_token_ids=[], exit_policy="gate", exit_threshold=0.5, skip_compute=True)),
    ]

    def run_all() -> list:
        results = []
        for model, kwargs in cases:
            prompts = padded if model is fp32 else [[7, 8, 9], list(range(20, 31)), [40, 41, 42, 43, 44]]
            tokens, stats = model.generate(prompts, 10, **greedy, **kwargs)
            results.append((tokens, stats.mean_steps))
        conversation, turns = PromptCache(), []
        for prompt in ([5, 6, 7, 8], [5, 6, 7, 8, 9, 10, 11]):  # the second turn keeps the first's K/V
            turns.append(fp32.generate(prompt, 6, temperature=0.0, eos_token_ids=[], prompt_cache=conversation))
        return results + [turns]

    monkeypatch.setattr(looplm.cache, "allocate", zero_everything)
    expected = run_all()
    monkeypatch.setattr(looplm.cache, "allocate", poisoned)
    assert run_all() == expected
    assert expected[2][1] < 4.0 and expected[5][1] < 4.0  # the early-exit cases really skipped steps
    assert len(expected[1][0][0]) == 4 and len(expected[1][0][1]) == 10  # row 0 stopped at eos, the others ran on
