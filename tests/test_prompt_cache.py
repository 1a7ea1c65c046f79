"""A conversation's K/V carried between requests (`looplm.prompt_cache.PromptCache`)."""

from __future__ import annotations

import pytest
from conftest import random_prompts

import looplm
from looplm.errors import GenerationError
from looplm.prompt_cache import CAPACITY_BUCKET, PromptCache


@pytest.fixture
def gqa_model(make_checkpoint):  # noqa: ANN001, ANN201
    path = make_checkpoint(seed=5, num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3,
                           max_position_embeddings=1024)
    return looplm.load(path, dtype="float32")


def test_each_turn_runs_only_its_new_tokens_and_decodes_as_a_fresh_prompt(gqa_model) -> None:  # noqa: ANN001
    first = random_prompts(300, [40], seed=1)[0]
    cache = PromptCache()
    reply, stats = gqa_model.generate(first, 12, eos_token_ids=[], prompt_cache=cache, return_stats=True)
    assert reply == gqa_model.generate(first, 12, eos_token_ids=[])
    assert stats.cached_tokens == 0 and cache.ids == first + reply[0][:-1]  # the last token was never fed
    second = first + reply[0] + random_prompts(300, [9], seed=2)[0]
    again, stats = gqa_model.generate(second, 12, eos_token_ids=[], prompt_cache=cache, return_stats=True)
    assert again == gqa_model.generate(second, 12, eos_token_ids=[])
    assert stats.cached_tokens == len(first) + len(reply[0]) - 1 and stats.prompt_tokens == len(second)


def test_only_the_shared_prefix_is_kept(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [30], seed=3)[0]
    cache = PromptCache()
    gqa_model.generate(prompt, 4, eos_token_ids=[], prompt_cache=cache)
    edited = prompt[:10] + [(prompt[10] + 1) % 300] + prompt[11:]  # the history changed at position 10
    out, stats = gqa_model.generate(edited, 6, eos_token_ids=[], prompt_cache=cache, return_stats=True)
    assert stats.cached_tokens == 10 and out == gqa_model.generate(edited, 6, eos_token_ids=[])
    _, stats = gqa_model.generate(prompt[:5], 3, eos_token_ids=[], prompt_cache=cache, return_stats=True)
    assert stats.cached_tokens == 4  # the last prompt token always runs: its logits pick the first new token
    _, stats = gqa_model.generate(prompt[:5], 3, eos_token_ids=[], prompt_cache=cache, steps=2, return_stats=True)
    assert stats.cached_tokens == 0  # K/V of three loops do not serve two


def test_growing_past_the_capacity_copies_the_kept_prefix(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [20], seed=4)[0]
    cache = PromptCache()
    gqa_model.generate(prompt, 3, eos_token_ids=[], prompt_cache=cache)
    assert cache.cache.max_len == CAPACITY_BUCKET
    longer = prompt + random_prompts(300, [CAPACITY_BUCKET], seed=5)[0]
    out, stats = gqa_model.generate(longer, 5, eos_token_ids=[], prompt_cache=cache, return_stats=True)
    assert cache.cache.max_len == 2 * CAPACITY_BUCKET and stats.cached_tokens == len(prompt)
    assert out == gqa_model.generate(longer, 5, eos_token_ids=[])


def test_a_growing_conversation_doubles_its_buffer(gqa_model) -> None:  # noqa: ANN001
    """Turns of ~300 tokens each: capacities 512 then 1024 (the context), not a copy every turn."""
    cache, history, sizes = PromptCache(), [], []
    for turn in range(3):
        history = history + random_prompts(300, [300], seed=10 + turn)[0]
        reply = gqa_model.generate(history, 2, eos_token_ids=[], prompt_cache=cache)[0]
        history = history + reply
        sizes.append(cache.cache.max_len)
    assert sizes == [2 * CAPACITY_BUCKET, 4 * CAPACITY_BUCKET, 4 * CAPACITY_BUCKET]


def test_a_cache_serves_one_generation_at_a_time(gqa_model) -> None:  # noqa: ANN001
    """Two generations in flight on one PromptCache would write into one buffer: the second is
    refused until the first ends, then the cache serves again."""
    from looplm.generate import stream_generate

    prompt = random_prompts(300, [20], seed=6)[0]
    cache = PromptCache()
    first = stream_generate(gqa_model, prompt, 4, eos_token_ids=[], prompt_cache=cache)
    next(first)
    with pytest.raises(GenerationError, match="in use by a generation still running"):
        next(stream_generate(gqa_model, prompt, 4, eos_token_ids=[], prompt_cache=cache))
    rest = list(first)
    assert len(rest) == 3 and not cache.in_use
    assert gqa_model.generate(prompt, 4, eos_token_ids=[], prompt_cache=cache) == gqa_model.generate(
        prompt, 4, eos_token_ids=[])


def test_another_models_cache_is_not_reused(gqa_model, make_checkpoint) -> None:  # noqa: ANN001
    """Same shape, other weights: its K/V would be silently wrong here."""
    other = looplm.load(make_checkpoint(seed=6, num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3,
                                        max_position_embeddings=1024), dtype="float32")
    prompt = random_prompts(300, [20], seed=7)[0]
    cache = PromptCache()
    other.generate(prompt, 4, eos_token_ids=[], prompt_cache=cache)
    out, stats = gqa_model.generate(prompt + [5], 4, eos_token_ids=[], prompt_cache=cache, return_stats=True)
    assert stats.cached_tokens == 0 and out == gqa_model.generate(prompt + [5], 4, eos_token_ids=[])


def test_sampling_with_a_seed_is_unchanged(gqa_model) -> None:  # noqa: ANN001
    prompt = random_prompts(300, [25], seed=6)[0]
    cache = PromptCache()
    gqa_model.generate(prompt, 5, eos_token_ids=[], prompt_cache=cache)
    longer = prompt + [7, 8, 9]
    sampled = gqa_model.generate(longer, 8, temperature=1.0, seed=11, eos_token_ids=[], prompt_cache=cache)
    assert sampled == gqa_model.generate(longer, 8, temperature=1.0, seed=11, eos_token_ids=[])


@pytest.mark.parametrize(("options", "refused"), [
    ({"input_ids": [[5, 6], [7, 8]]}, "a batch of 2"), ({"kv_mode": "shared"}, "kv_mode='shared'"),
    ({"skip_compute": True}, "skip_compute"), ({"draft_steps": 1}, "draft_steps"),
    ({"use_cache": False}, "use_cache=False"), ({"decoder": "eager"}, "a prompt_cache"),
    ({"input_ids": [[0, 5, 6]], "attention_mask": __import__("torch").tensor([[0, 1, 1]])}, "padding"),
])
def test_options_that_keep_other_kv_are_refused(gqa_model, options: dict, refused: str) -> None:  # noqa: ANN001
    options = {"input_ids": [5, 6, 7], **options}
    with pytest.raises(GenerationError, match=refused):
        gqa_model.generate(max_new_tokens=2, prompt_cache=PromptCache(), **options)


def test_clear_forgets_the_conversation(gqa_model) -> None:  # noqa: ANN001
    cache = PromptCache()
    gqa_model.generate([5, 6, 7, 8], 2, prompt_cache=cache)
    cache.clear()
    assert cache.cache is None and cache.ids == []
    _, stats = gqa_model.generate([5, 6, 7, 8], 2, prompt_cache=cache, return_stats=True)
    assert stats.cached_tokens == 0


def test_chat_carries_the_conversation_between_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import looplm.cli.chat as chat_module
    from looplm.cli import app

    seen = []
    real = chat_module.stream_text

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for chunk in real(*args, **kwargs):
            if chunk.finish_reason:
                seen.append((chunk.stats.prompt_tokens, chunk.stats.cached_tokens))
            yield chunk

    monkeypatch.setattr(chat_module, "stream_text", spy)
    # Greedy: the embedded model samples by default, and whether a reply's tokens come back the same
    # when its text is re-encoded in the next prompt depends on the reply.
    result = CliRunner().invoke(app, ["chat", "--max-new-tokens", "6", "--device", "cpu", "--temperature", "0"],
                                input="tell me about the king\nand the duke?\n/reset\nhello\n")
    assert result.exit_code == 0, result.output
    (first, none), (second, kept), (_, after_reset) = seen
    assert none == 0 and first <= kept < second  # the second turn re-ran only what the first did not hold
    assert after_reset == 0
    skipping = CliRunner().invoke(app, ["chat", "--max-new-tokens", "4", "--skip-compute"], input="a\nb\n")
    assert skipping.exit_code == 0 and seen[-1][1] == 0  # compute skipping keeps other K/V: no carrying
