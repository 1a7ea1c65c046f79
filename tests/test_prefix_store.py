"""The server's prefix store: a finished request's K/V serve later prompts that start the same way."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

import looplm
from looplm.sampling import SamplingParams
from looplm.server import build_app
from looplm.server.engine import Engine, Sequence
from looplm.server.prefix_store import PrefixStore


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPLM_HOME", str(tmp_path_factory.mktemp("home")))
        return looplm.load(dtype="float32")


def run(engine: Engine, prompt: list[int], budget: int, loop=None, **fields: object) -> tuple[list[int], Sequence]:  # noqa: ANN001
    """Submit one sequence and wait for it: its tokens and the sequence."""
    tokens: list[int] = []
    done = threading.Event()

    def on_event(event) -> None:  # noqa: ANN001
        if event.kind == "token":
            tokens.append(event.token)
        elif event.kind != "prompt":
            done.set()

    seq = Sequence(prompt, budget, loop or engine.loop_config(), SamplingParams(), None, frozenset(), on_event,
                   **fields)
    engine.submit(seq)
    assert done.wait(60)
    return tokens, seq


def prompt_of(length: int, seed: int) -> list[int]:
    return torch.randint(5, 4000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_next_turn_prefills_only_what_is_new_and_decodes_the_same(model) -> None:  # noqa: ANN001
    engine = Engine(model, max_context=512, prefix_cache_bytes=64 << 20).start()
    try:
        first = prompt_of(40, 1)
        reply, _ = run(engine, first, 8)
        second = first + reply + prompt_of(12, 2)
        again, seq = run(engine, second, 10)
        assert seq.cached_tokens == len(first) + len(reply) - 1  # the last reply token was never fed back
        assert engine.cached_prompt_tokens_total == seq.cached_tokens
        assert again == model.generate(second, 10, eos_token_ids=[])[0]
        other, seq = run(engine, prompt_of(30, 3), 4)  # nothing stored starts this way
        assert seq.cached_tokens == 0 and other == model.generate(prompt_of(30, 3), 4, eos_token_ids=[])[0]
    finally:
        engine.stop()


def test_loop_settings_that_store_other_kv_neither_store_nor_reuse(model) -> None:  # noqa: ANN001
    engine = Engine(model, max_context=512, prefix_cache_bytes=64 << 20).start()
    try:
        first = prompt_of(40, 4)
        for options in ({"kv_mode": "shared"}, {"skip_compute": True, "exit_policy": "gate", "exit_threshold": 0.5}):
            run(engine, first, 6, engine.loop_config(**options))
        assert len(engine.prefix_store) == 0
        reply, _ = run(engine, first, 6)
        for options in ({"kv_mode": "shared"}, {"loops": 2}):  # another loop count: other K/V
            _, seq = run(engine, first + reply, 3, engine.loop_config(**options))
            assert seq.cached_tokens == 0
        _, seq = run(engine, first + reply, 0, echo_logprobs=True, logprobs=0)  # reads every prompt position
        assert seq.cached_tokens == 0
    finally:
        engine.stop()


def test_the_store_keeps_its_budget_and_drops_what_a_longer_entry_extends() -> None:
    kv = lambda n: torch.zeros(2, 1, n, 4)  # noqa: E731 - [T*L, H, n, D], 32 bytes a position per tensor
    store = PrefixStore(budget_bytes=64 * 50, min_tokens=4)
    store.put(4, list(range(20)), kv(20), kv(20))
    store.put(4, list(range(30)), kv(30), kv(30))  # extends the first: replaces it
    assert len(store) == 1 and store.nbytes == 64 * 30
    assert store.longest(4, list(range(25)) + [99])[0] == 25
    assert store.longest(4, list(range(10)))[0] == 9  # the last prompt token always runs
    assert store.longest(2, list(range(25)))[1] is None  # another loop count
    assert store.longest(4, [1, 2, 3])[1] is None  # no shared prefix of min_tokens
    store.put(4, [7] * 25, kv(25), kv(25))  # over budget: the least recently used entry goes
    assert len(store) == 1 and store.longest(4, [7] * 26)[0] == 25
    store.put(4, list(range(60)), kv(60), kv(60))  # larger than the whole budget: its first 50 tokens
    assert len(store) == 1 and store.nbytes == 64 * 50
    shared, entry = store.longest(4, list(range(61)))
    assert shared == 50 and entry.ids == tuple(range(50)) and entry.keys.shape[2] == 50
    store.put(4, [9] * 60, kv(60), kv(60))
    assert store.longest(4, list(range(61)))[1] is None  # the budget holds one such entry
    small = PrefixStore(budget_bytes=64 * 3, min_tokens=4)
    small.put(4, list(range(9)), kv(9), kv(9))  # fewer than min_tokens fit: nothing is kept
    assert len(small) == 0 and small.nbytes == 0


def test_usage_reports_cached_prompt_tokens(model) -> None:  # noqa: ANN001
    from test_server import ServerThread

    with ServerThread(build_app(model, "m", max_context=512)) as running:
        messages = [{"role": "user", "content": "tell me about the king and the duke " * 6}]
        body = {"model": "m", "messages": messages, "max_tokens": 8, "temperature": 0}
        first = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=60).json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        messages += [first["choices"][0]["message"] | {"reasoning_content": None},
                     {"role": "user", "content": "and then?"}]
        second = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=60).json()
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert first["usage"]["prompt_tokens"] <= cached < second["usage"]["prompt_tokens"]
        metrics = httpx.get(running.url + "/metrics", timeout=10).text
        assert f"looplm_cached_prompt_tokens_total {cached}" in metrics
        # n choices share one prompt pass: the counter rises by what that pass took from the store, once.
        messages += [second["choices"][0]["message"] | {"reasoning_content": None},
                     {"role": "user", "content": "and after that?"}]
        third = httpx.post(running.url + "/v1/chat/completions", json={**body, "n": 3}, timeout=60).json()
        again = third["usage"]["prompt_tokens_details"]["cached_tokens"]
        metrics = httpx.get(running.url + "/metrics", timeout=10).text
        assert again > 0 and f"looplm_cached_prompt_tokens_total {cached + again}" in metrics
