"""Self-speculative decoding: same greedy tokens as normal decoding, exact sampling, refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

import looplm
from looplm.errors import GenerationError
from looplm.generate import generate
from looplm.sampling import SamplingParams, probabilities
from looplm.speculative import accept_drafts


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):  # noqa: ANN001, ANN201
    from conftest import small_config

    from looplm.default_model import write_random_checkpoint

    path = tmp_path_factory.mktemp("spec") / "gqa"
    write_random_checkpoint(path, small_config(num_attention_heads=4, num_key_value_heads=2, total_ut_steps=4,
                                               head_dim=16, rope_theta=5e5), seed=7)
    return looplm.load(path, dtype="float32")


@pytest.mark.parametrize("draft_steps", [1, 2, 3])
@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
@pytest.mark.filterwarnings("ignore:speculative decoding of a batch")
def test_greedy_tokens_and_exit_steps_equal_normal_decoding(gqa_model, draft_steps: int, draft_tokens: int) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [6, 13, 1], seed=5)  # left-padded batch, one 1-token prompt
    for kwargs in ({}, {"exit_threshold": 0.5}):
        normal, normal_stats = generate(gqa_model, prompts, 17, eos_token_ids=[], return_stats=True, **kwargs)
        spec, stats = generate(gqa_model, prompts, 17, eos_token_ids=[], return_stats=True, draft_steps=draft_steps,
                               draft_tokens=draft_tokens, **kwargs)
        assert spec == normal
        assert stats.steps_per_token == normal_stats.steps_per_token
        assert stats.new_tokens == 17 and stats.draft_rounds >= 16 / draft_tokens
        # a round drafts draft_tokens, or fewer near the end: never more than the budget has left
        assert stats.draft_rounds <= stats.draft_proposed <= stats.draft_rounds * draft_tokens
        assert 0 <= stats.draft_accepted <= min(stats.draft_proposed, 16)  # accepted drafts are returned tokens


@pytest.mark.filterwarnings("ignore:speculative decoding of a batch")
def test_no_round_drafts_past_the_token_budget(gqa_model) -> None:  # noqa: ANN001
    """2 new tokens with 8 drafts a round reported "drafts accepted 4/8": drafts past the budget
    were computed, counted and thrown away."""
    prompt = random_prompts(300, [6], seed=5)
    for new_tokens in (2, 3, 5):
        tokens, stats = generate(gqa_model, prompt, new_tokens, eos_token_ids=[], return_stats=True, draft_steps=2,
                                 draft_tokens=8)
        assert tokens == generate(gqa_model, prompt, new_tokens, eos_token_ids=[])
        assert stats.draft_accepted <= new_tokens - 1
        if new_tokens == 2:  # one round, which may draft one token
            assert (stats.draft_rounds, stats.draft_proposed) == (1, 1)


@pytest.mark.parametrize("policy", ["last", "confidence", "kl", "fixed", "weighted"])
@pytest.mark.filterwarnings("ignore:speculative decoding of a batch")
def test_every_exit_policy_reads_the_same_logits(gqa_model, policy: str) -> None:  # noqa: ANN001
    prompts = random_prompts(300, [9, 4], seed=2)
    kwargs = {"exit_policy": policy, "eos_token_ids": [], "return_stats": True}
    if policy in ("confidence", "kl"):
        kwargs["exit_threshold"] = 0.5
    normal, normal_stats = generate(gqa_model, prompts, 12, **kwargs)
    spec, stats = generate(gqa_model, prompts, 12, draft_steps=2, draft_tokens=3, **kwargs)
    assert spec == normal and stats.steps_per_token == normal_stats.steps_per_token


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.filterwarnings("ignore:speculative decoding of a batch")
def test_confidence_stop_drafts_less_and_keeps_the_output(gqa_model, temperature: float) -> None:  # noqa: ANN001
    """`draft_confidence` ends drafting at an unsure draft: rounds propose fewer drafts; greedy
    tokens stay normal decoding's, and sampled runs still fill the budget (their draws differ
    from the fixed-length run's, which consumes other random numbers)."""
    prompts = random_prompts(300, [8, 3], seed=9)
    args = {"eos_token_ids": [], "return_stats": True, "draft_steps": 2, "draft_tokens": 6, "temperature": temperature,
            "seed": 4}
    fixed, _ = generate(gqa_model, prompts, 20, **args)
    adaptive, stats = generate(gqa_model, prompts, 20, draft_confidence=0.9, **args)
    assert stats.draft_proposed < stats.draft_rounds * 6  # some rounds stopped drafting early
    assert stats.draft_proposed >= stats.draft_rounds  # and every round drafted at least once
    assert all(len(row) == 20 for row in adaptive)
    if temperature == 0.0:
        assert adaptive == fixed == generate(gqa_model, prompts, 20, eos_token_ids=[])


def test_drafting_with_all_but_one_loop_is_mostly_accepted_on_the_trained_model() -> None:
    """The embedded model was trained so that later loops refine earlier ones: a 3-loop draft
    agrees with the 4-loop model far more often than a 1-loop draft (measured, not assumed)."""
    model = looplm.load(None, dtype="float32")
    prompt = model.tokenizer.encode("ROMEO:\nWhat light through yonder window")
    rates = {}
    for k in (1, 3):
        normal = generate(model, [prompt], 48, eos_token_ids=[])
        spec, stats = generate(model, [prompt], 48, eos_token_ids=[], draft_steps=k, draft_tokens=4, return_stats=True)
        assert spec == normal
        rates[k] = stats.draft_acceptance
    assert rates[3] > rates[1]
    assert rates[3] > 0.5


def test_a_batch_is_warned_that_it_keeps_only_the_common_prefix(gqa_model) -> None:  # noqa: ANN001
    with pytest.warns(UserWarning, match="one sequence at a time"):
        generate(gqa_model, random_prompts(300, [3, 4]), 3, draft_steps=1)


def test_sampling_is_reproducible_and_stops_like_normal_decoding(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [7], seed=1)
    args = {"temperature": 1.0, "top_p": 0.9, "top_k": 40, "seed": 11, "draft_steps": 1, "draft_tokens": 4}
    first = generate(gqa_model, prompt, 20, eos_token_ids=[], **args)
    assert first == generate(gqa_model, prompt, 20, eos_token_ids=[], **args)
    assert len(first[0]) == 20
    stop_at = first[0][5]  # a token id the run emits: used as an eos id it ends the row there
    stopped = generate(gqa_model, prompt, 20, eos_token_ids=[stop_at], **args)
    assert stopped[0] == first[0][: first[0].index(stop_at) + 1]


def test_rejection_rule_keeps_the_target_distribution() -> None:
    """One draft per row, 200k rows: drafts from q, accepted with min(1, p/q), else redrawn from
    max(0, p - q). The emitted tokens must follow p, not q (chi-square style bound)."""
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 6, 200_000
    params = SamplingParams(temperature=1.0)
    target_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]]).expand(rows, vocab)
    draft_logits = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.5, -2.0]]).expand(rows, vocab)
    q = probabilities(draft_logits, params)
    drafts = torch.multinomial(q, 1, generator=gen)
    tokens, accepted = accept_drafts(drafts, [q], [target_logits], params, gen)
    assert accepted == 0 and len(tokens) == 1  # some row rejected, so the round keeps no draft
    observed = torch.bincount(tokens[0], minlength=vocab).float() / rows
    expected = probabilities(target_logits[:1], params)[0]
    assert (observed - expected).abs().max() < 0.005, (observed, expected)
    assert (observed - q[0]).abs().max() > 0.1  # and it is not the draft's distribution


def test_greedy_acceptance_counts_the_prefix_every_row_agreed_on() -> None:
    drafts = torch.tensor([[5, 6, 7], [5, 6, 1]])
    logits = [torch.nn.functional.one_hot(torch.tensor(t), 10).float() for t in ([5, 5], [6, 6], [7, 7])]
    tokens, accepted = accept_drafts(drafts, [], logits, SamplingParams(), None)
    assert accepted == 2  # row 1's third draft (1) disagrees with the model's 7
    assert [t.tolist() for t in tokens] == [[5, 5], [6, 6], [7, 7]]  # two drafts, then the correction
    tokens, accepted = accept_drafts(drafts[:1], [], [x[:1] for x in logits], SamplingParams(), None)
    assert accepted == 3 and len(tokens) == 3  # all accepted: the drafts, no extra token


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"draft_steps": 0}, "draft_steps must be an integer from 1 to 3"),
    ({"draft_steps": 4}, "draft_steps must be an integer from 1 to 3"),
    ({"draft_steps": 2, "steps": 2}, "from 1 to 1"),
    ({"draft_steps": 1, "steps": 1}, "runs 1 loop; use it with 2 or more"),
    ({"draft_steps": 1, "draft_tokens": 0}, "draft_tokens"),
    ({"draft_steps": 1, "draft_confidence": 1.0}, "draft_confidence must be in"),
    ({"draft_steps": 1, "use_cache": False}, "use_cache=False"),
    ({"draft_steps": 1, "kv_mode": "shared"}, "kv_mode='shared'"),
    ({"draft_steps": 1, "skip_compute": True}, "skip_compute"),
    ({"draft_steps": 1, "decoder": "eager"}, "draft_steps"),
])
def test_refusals_are_one_line(gqa_model, kwargs: dict, needle: str) -> None:  # noqa: ANN001
    with pytest.raises(GenerationError, match=needle) as info:
        generate(gqa_model, random_prompts(300, [4]), 4, **kwargs)
    assert "\n" not in str(info.value)


def test_round_arithmetic_of_the_benchmark() -> None:
    from looplm.bench_speculative import break_even_acceptance, expected_tokens_per_round

    assert expected_tokens_per_round(0.0, 4) == 1.0  # only the correction
    assert expected_tokens_per_round(1.0, 4) == 4.0  # every draft, no extra token
    assert abs(expected_tokens_per_round(0.5, 3) - 1.75) < 1e-12  # 1 + 0.5 + 0.25
    even = break_even_acceptance(1.75, 3)
    assert even is not None and abs(even - 0.5) < 1e-9
    assert break_even_acceptance(4.5, 4) is None  # a round dearer than 4 steps never pays with 4 drafts
    assert break_even_acceptance(0.9, 2) == 0.0 or break_even_acceptance(0.9, 2) < 1e-9


def test_benchmark_runs_end_to_end_on_tiny_shapes(capsys: pytest.CaptureFixture) -> None:
    from looplm.bench_speculative import main

    assert main(["--shape", "tiny", "--new-tokens", "4", "--repeats", "1", "--draft-tokens", "2,3", "--confidences",
                 "0.3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "Part 1:" in out and "Part 2: Ouro tiny shape" in out and "up to 3, stop below 0.3" in out
    import json

    result = json.loads(out.strip().splitlines()[-1])
    assert [(r["draft_steps"], r["draft_tokens"]) for r in result["cost"]["rows"]] == [
        (k, g) for k in (1, 2, 3) for g in (2, 3)]
    projected = result["projections"]
    assert len(projected) == 9 and all(p["projected_speedup"] > 0 for p in projected)
    # A fitted line, or the measured bound where a noisy two-point line fell below zero
    assert {p["cost_source"] for p in projected if p["draft_confidence"]} <= {"fit", "bound"}
    assert all(p["cost_source"] == "measured" for p in projected if not p["draft_confidence"])
    assert main(["--draft-tokens", "0"]) == 1
    assert main(["--confidences", "1.5"]) == 1


def test_a_fit_below_zero_falls_back_to_the_measured_bound() -> None:
    """Two noisy points can tilt the line so that it is negative at a small mean number of
    drafts (seen under load: a projected speed-up below zero); the bound is used there."""
    from looplm.bench_speculative import projections

    cost = {"rows": [{"draft_steps": 1, "draft_tokens": 2, "round_over_step": 0.4},
                     {"draft_steps": 1, "draft_tokens": 3, "round_over_step": 1.6}]}  # line: -2 + 1.2 x
    acceptance = {"rows": [{"draft_steps": 1, "draft_tokens": 3, "draft_confidence": 0.3, "mean_drafts": 1.0,
                            "tokens_per_round": 1.5},
                           {"draft_steps": 1, "draft_tokens": 3, "draft_confidence": 0.3, "mean_drafts": 2.5,
                            "tokens_per_round": 2.0}]}
    low, high = projections(acceptance, cost)
    assert (low["cost_source"], low["round_over_step"]) == ("bound", 0.4)  # gamma 2 drafts at least 1
    assert (high["cost_source"], high["round_over_step"]) == ("fit", pytest.approx(1.0))
    assert low["projected_speedup"] == pytest.approx(1.5 / 0.4)


def test_benchmark_part_one_takes_another_model(make_checkpoint, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    """`--model`: part 1 on any looped checkpoint with a tokenizer (a real Ouro one measures the real
    acceptance); `--shape none` skips part 2; a model without a tokenizer is a one-line error."""
    import json

    from looplm.bench_speculative import main

    path = make_checkpoint(seed=1, total_ut_steps=3)
    assert main(["--model", str(path), "--dtype", "float32", "--shape", "none", "--new-tokens", "3", "--repeats", "1",
                 "--draft-tokens", "2", "--confidences", ""]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["acceptance"]["model"] == str(path) and result["acceptance"]["steps"] == 3
    assert [r["draft_steps"] for r in result["acceptance"]["rows"]] == [1, 2] and "cost" not in result
    (path / "tokenizer.json").unlink()
    assert main(["--model", str(path), "--shape", "none"]) == 1
    assert "no tokenizer" in capsys.readouterr().err


def test_round_cost_line_fit() -> None:
    from looplm.bench_speculative import round_cost_fit

    rows = [{"draft_steps": 2, "draft_tokens": g, "round_over_step": 0.5 + 0.5 * g} for g in (2, 3, 4, 6)]
    rows.append({"draft_steps": 1, "draft_tokens": 2, "round_over_step": 1.0})  # one point: no line
    fits = round_cost_fit({"rows": rows})
    assert set(fits) == {2}
    intercept, slope = fits[2]
    assert abs(intercept - 0.5) < 1e-12 and abs(slope - 0.5) < 1e-12
