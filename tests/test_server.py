"""The OpenAI-compatible server, end to end on loopback with the official `openai` client.

A real uvicorn server runs in a thread of the test process on a free port. The embedded model
runs in float32 so that greedy outputs have no bf16 near-ties: a row inside a batch must give
exactly the tokens it gives alone.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import looplm  # noqa: E402
from looplm.sampling import SamplingParams  # noqa: E402
from looplm.server import DEFAULT_MODEL_NAME, build_app  # noqa: E402
from looplm.server.app import create_app  # noqa: E402
from looplm.server.batch import Batch, prefill_prompts  # noqa: E402
from looplm.server.engine import Engine, Sequence  # noqa: E402

NAME = DEFAULT_MODEL_NAME


class ServerThread:
    """uvicorn on 127.0.0.1, a free port, in a daemon thread."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPLM_HOME", str(tmp_path_factory.mktemp("home")))
        return looplm.load(dtype="float32")


@pytest.fixture(scope="module")
def server(model):  # noqa: ANN001, ANN201
    with ServerThread(build_app(model, NAME, max_context=512, max_batch=8)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):  # noqa: ANN001, ANN201
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def engine_of(server):  # noqa: ANN001, ANN201
    return server.server.config.app.state.engine


def chat(client, content: str, **kwargs):  # noqa: ANN001, ANN201
    return client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": content}], temperature=0, **kwargs
    )


def test_models_health_and_metrics(server, client) -> None:  # noqa: ANN001
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError, match="model 'other/model' does not exist"):
        client.models.retrieve("other/model")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("requests_total", "prompt_tokens_total", "completion_tokens_total", "queue_depth",
                 "running_sequences", "mean_loops_per_token", "prefills_total",
                 "prefilling_sequences"):
        assert f"looplm_{name}" in text


def test_chat_matches_library_greedy(client, model) -> None:  # noqa: ANN001
    reply = chat(client, "What is 2+2?", max_tokens=12, extra_body={"loops": 3})
    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]))
    expected = model.generate(ids, 12, steps=3)[0]
    choice = reply.choices[0]
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.model_extra["mean_loops_per_token"] == pytest.approx(3.0)
    assert choice.message.content == tok.decode(expected)
    assert choice.finish_reason == ("stop" if expected[-1] in model.config.eos_token_ids else "length")


def test_penalties_and_logit_bias_match_the_library(client, model) -> None:  # noqa: ANN001
    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Tell me a story"}]))
    free = model.generate(ids, 24)[0]
    settings = {"presence_penalty": 0.5, "frequency_penalty": 1.0, "logit_bias": {free[0]: -100.0, 200: 2.5}}
    expected = model.generate(ids, 24, **settings)[0]
    assert expected != free and free[0] not in expected
    reply = chat(client, "Tell me a story", max_tokens=24, presence_penalty=0.5, frequency_penalty=1.0,
                 logit_bias={str(free[0]): -100, "200": 2.5})
    assert reply.choices[0].message.content == tok.decode(expected)
    together = chat(client, "Tell me a story", max_tokens=24, n=2, **{k: v for k, v in settings.items()
                                                                      if k != "logit_bias"})
    alone = model.generate(ids, 24, presence_penalty=0.5, frequency_penalty=1.0)[0]
    assert [c.message.content for c in together.choices] == [tok.decode(alone)] * 2  # counts kept per choice
    repeated = chat(client, "Tell me a story", max_tokens=24, extra_body={"repetition_penalty": 1.4})
    expected = model.generate(ids, 24, repetition_penalty=1.4)[0]
    assert expected != free and repeated.choices[0].message.content == tok.decode(expected)
    sampled = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Tell me a story"}],
                                             max_tokens=24, temperature=1.5, seed=3, extra_body={"min_p": 1.0})
    assert sampled.choices[0].message.content == tok.decode(free)  # only the likeliest token survives min_p 1


def test_ignore_eos_and_stop_token_ids(client, model) -> None:  # noqa: ANN001
    tok, eos = model.tokenizer, model.config.eos_token_ids[0]
    to_eos = {"logit_bias": {str(eos): 100}}  # the likeliest token is then always eos
    ended = client.completions.create(model=NAME, prompt="Once upon", max_tokens=5, temperature=0, extra_body=to_eos)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1
    kept = client.completions.create(model=NAME, prompt="Once upon", max_tokens=5, temperature=0,
                                     extra_body={**to_eos, "ignore_eos": True})
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 5
    ids = tok.encode("Once upon")
    assert model.generate(ids, 5, eos_token_ids=[], logit_bias={eos: 100})[0] == [eos] * 5

    free = model.generate(ids, 10, eos_token_ids=[])[0]
    at = next(i for i in range(2, 10) if free[i] not in free[:i])  # the first time this token comes
    cut = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0,
                                    extra_body={"stop_token_ids": [free[at]], "ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == at + 1
    assert cut.choices[0].text == tok.decode(free[:at])  # the stop token's own text is left out


def test_streaming_chat_equals_whole(client) -> None:  # noqa: ANN001
    whole = chat(client, "Tell me a story", max_tokens=16).choices[0]
    stream = chat(client, "Tell me a story", max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.finish_reason]
    assert chunks[-1].usage.completion_tokens <= 16
    assert all(c.usage is None for c in chunks[:-1])
    raw = httpx.post(str(client.base_url) + "chat/completions", timeout=60, json={
        "model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}}).text
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    assert all("usage" in e and e["usage"] is None for e in events[:-1])  # OpenAI's chunks say null
    assert events[-1]["usage"]["completion_tokens"] <= 4


def test_completions_n_and_stop(client, model) -> None:  # noqa: ANN001
    reply = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: the same twice
    text = reply.choices[0].text
    if len(text) > 3:  # stop at a string the greedy output is known to contain
        stop = text[2:4]
        cut = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_the_choices_of_a_prompt_share_one_prefill(server, client, model) -> None:  # noqa: ANN001
    engine = engine_of(server)
    before = engine.prefills_total
    reply = client.completions.create(model=NAME, prompt="Once upon", max_tokens=6, temperature=1.0, seed=40, n=4)
    assert engine.prefills_total == before + 1
    ids = model.tokenizer.encode("Once upon")
    for i, choice in enumerate(reply.choices):  # choice i samples with seed + i, as it would alone
        top_p = model.generation_defaults.get("top_p", 1.0)  # the server's default for a request without one
        expected = model.generate(ids, 6, temperature=1.0, top_p=top_p, seed=40 + i)[0]
        assert choice.text == model.tokenizer.decode(expected), i
    assert len({c.text for c in reply.choices}) > 1


def test_seeded_sampling_is_reproducible(client) -> None:  # noqa: ANN001
    a = client.completions.create(model=NAME, prompt="abc", max_tokens=8, temperature=1.0, seed=7)
    b = client.completions.create(model=NAME, prompt="abc", max_tokens=8, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_chat_logprobs_are_the_models_own(client, model) -> None:  # noqa: ANN001
    """Greedy: each token is its step's argmax, so its log-probability heads its alternatives; the
    first one equals log-softmax of the library's logits for the prompt's last position."""
    reply = chat(client, "What is 2+2?", max_tokens=8, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    for entry in entries:
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob == pytest.approx(alternatives[0]) and entry.logprob <= 0
        assert entry.token == entry.top_logprobs[0].token and entry.bytes == list(entry.token.encode())
    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}]))
    with torch.inference_mode():
        logits, _ = model.exit_logits(model.forward_steps(torch.tensor([ids])), position=-1)
    expected = torch.log_softmax(logits[0, 0].float(), dim=-1)
    first = expected.topk(3)
    assert entries[0].logprob == pytest.approx(float(first.values[0]), abs=1e-4)
    assert [alt.token for alt in entries[0].top_logprobs] == [tok.decode([i], skip_special_tokens=False)
                                                              for i in first.indices.tolist()]
    assert chat(client, "What is 2+2?", max_tokens=2).choices[0].logprobs is None  # only when asked for


def test_streamed_completion_logprobs_follow_the_tokens(client) -> None:  # noqa: ANN001
    whole = client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0, logprobs=2)
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 10
    if whole.choices[0].finish_reason == "length":  # no eos among them: the token texts are the text
        assert "".join(logprobs.tokens) == whole.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(10)]
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-6
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    chunks = list(client.completions.create(model=NAME, prompt="Once upon", max_tokens=10, temperature=0, logprobs=2,
                                            stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for part in streamed for t in part.tokens] == logprobs.tokens
    assert [o for part in streamed for o in part.text_offset] == logprobs.text_offset
    assert [lp for part in streamed for lp in part.token_logprobs] == pytest.approx(logprobs.token_logprobs)


def test_echo_scores_the_prompt_like_the_library(client, model) -> None:  # noqa: ANN001
    """What lm-eval's API models send to score a continuation: echo, max_tokens 0, logprobs."""
    prompt = "Once upon a time there was"
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = reply.choices[0]
    ids = model.tokenizer.encode(prompt, add_special_tokens=True)
    assert choice.text == prompt and reply.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == len(ids) and choice.logprobs.token_logprobs[0] is None
    with torch.inference_mode():
        logits, _ = model.exit_logits(model.forward_steps(torch.tensor([ids])))
    expected = torch.log_softmax(logits[0].float(), dim=-1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1))
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected.squeeze(1).tolist(), abs=1e-4)
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])

    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0)
    echoed = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=0)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert len(echoed.choices[0].logprobs.tokens) == len(ids) + echoed.usage.completion_tokens
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                            stream=True))
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == echoed.choices[0].text


def test_lm_eval_loglikelihood_request_with_token_ids(client, model) -> None:  # noqa: ANN001
    """lm-evaluation-harness's `local-completions` scores a continuation with token ids, echo,
    max_tokens 1 and logprobs 1, and reads `token_logprobs[ctxlen:-1]`: that must be the
    continuation's log-likelihood as the library computes it."""
    context = model.tokenizer.encode("The king is", add_special_tokens=True)
    continuation = model.tokenizer.encode(" dead", add_special_tokens=False)
    ids = context + continuation
    reply = client.completions.create(model=NAME, prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0,
                                      seed=1234)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1  # the prompt's tokens, then the generated one
    with torch.inference_mode():
        logits, _ = model.exit_logits(model.forward_steps(torch.tensor([ids])))
    expected = torch.log_softmax(logits[0].float(), dim=-1)[len(context) - 1 : -1]
    expected = expected.gather(1, torch.tensor(continuation).unsqueeze(1)).sum()
    assert sum(logprobs.token_logprobs[len(context) : -1]) == pytest.approx(float(expected), abs=1e-4)
    assert reply.choices[0].text.startswith(model.tokenizer.decode(ids, skip_special_tokens=False))
    bad = httpx.post(str(client.base_url) + "completions", json={"model": NAME, "prompt": [[1, 10**7]]}, timeout=30)
    assert bad.status_code == 400 and "token ids" in bad.json()["error"]["message"]


def test_a_model_without_tokenizer_answers_400_on_text_routes() -> None:
    bare = looplm.load(dtype="float32")
    bare.tokenizer = None
    with ServerThread(build_app(bare, NAME, max_context=64)) as running:
        requests = [("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}),
                    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 2}),
                    ("/tokenize", {"prompt": "hi"})]
        for route, body in requests:
            response = httpx.post(running.url + route, json=body, timeout=30)
            assert response.status_code == 400 and "has no tokenizer" in response.json()["error"]["message"]


def test_tokenizer_routes(server, model) -> None:  # noqa: ANN001
    tok = model.tokenizer
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert (info["eos_token"], info["chat_template"]) == (tok.eos_token, tok.chat_template)
    encoded = httpx.post(server.url + "/tokenize", json={"prompt": "Hello there", "add_special_tokens": False}).json()
    assert encoded["tokens"] == tok.encode("Hello there") and encoded["count"] == len(encoded["tokens"])
    decoded = httpx.post(server.url + "/detokenize", json={"tokens": encoded["tokens"]}).json()
    assert decoded["prompt"] == "Hello there"
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**7]}).status_code == 400
    assert httpx.post(server.url + "/tokenize", json={"text": "no prompt field"}).status_code == 400


def test_lm_evaluation_harness_scores_through_the_server(server, model) -> None:  # noqa: ANN001
    """lm-eval's own API client (`local-completions`, remote tokenizer) against `looplm serve`:
    its log-likelihoods and greedy flags equal the library's."""
    pytest.importorskip("tenacity", reason="needs lm-eval[api] (pip install 'looplm[lm-eval]')")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(model=NAME, base_url=server.url + "/v1/completions", tokenizer_backend="remote",
                             num_concurrent=1, max_retries=1, max_length=256)
    pairs = [("The king is", " dead"), ("7-8+9-5=", "3"), ("ROMEO:", " What light")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    tok = model.tokenizer
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        ctx, cont = tok.encode(context), tok.encode(continuation)
        with torch.inference_mode():
            logits, _ = model.exit_logits(model.forward_steps(torch.tensor([ctx + cont])))
        logprobs = torch.log_softmax(logits[0, len(ctx) - 1 : -1].float(), dim=-1)
        assert logprob == pytest.approx(float(logprobs.gather(1, torch.tensor(cont).unsqueeze(1)).sum()), abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == torch.tensor(cont)).all())


LOOP_OPTIONS = [
    {},
    {"loops": 2},
    {"exit_policy": "gate", "exit_threshold": 0.5, "skip_compute": True},
    {"kv_mode": "shared"},
]


def test_eight_concurrent_clients_match_alone(server, client) -> None:  # noqa: ANN001
    requests = [("x" * (3 + 5 * i) + f" prompt {i}", LOOP_OPTIONS[i % len(LOOP_OPTIONS)]) for i in range(8)]

    def ask(request: tuple[str, dict]) -> tuple[list[str], str]:
        reply = client.completions.create(model=NAME, prompt=request[0], max_tokens=24, temperature=0,
                                          extra_body=request[1])
        return reply.choices[0].text, reply.choices[0].finish_reason

    alone = [ask(r) for r in requests]
    engine = engine_of(server)
    engine.peak_running = 0
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert engine.peak_running > 1, "the requests never shared a decode step"


def test_a_round_of_waiting_prompts_is_prefilled_together(model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Sequences queued before the engine starts are admitted in one round: prefilled in one
    left-padded pass per loop configuration (and per PREFILL_ROWS), each still getting exactly
    the tokens it gets alone."""
    from looplm.server import engine as engine_module

    passes: list[int] = []
    real = engine_module.prefill_prompts

    def counted(model, steps, policy, prompts, every_position=False):  # noqa: ANN001, ANN202
        passes.append(len(prompts))
        return real(model, steps, policy, prompts, every_position)

    monkeypatch.setattr(engine_module, "prefill_prompts", counted)
    monkeypatch.setattr(engine_module, "PREFILL_ROWS", 3)
    engine = Engine(model, max_context=256, max_batch=16)
    lengths, budgets = [3, 40, 11, 11, 25, 7], [5, 3, 6, 6, 4, 8]
    prompts = [[5 + (11 * i + j) % 240 for j in range(n)] for i, n in enumerate(lengths)]
    prompts[3] = list(prompts[2])  # two requests with one prompt share its row
    loops = [engine.loop_config(), engine.loop_config(2)]
    outputs = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        def on_event(event, i=i) -> None:  # noqa: ANN001
            if event.kind == "token":
                outputs[i].append(event.token)
            else:
                done[i].set()
        engine.submit(Sequence(prompt, budget, loops[i % 2 == 1 and i > 3], SamplingParams(), None, frozenset(),
                               on_event))
    engine.start()
    try:
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    used = [loops[i % 2 == 1 and i > 3] for i in range(len(prompts))]  # prompt 5 runs 2 loops, the rest 4
    expected = [model.generate(p, b, eos_token_ids=[], steps=loop.steps)[0]
                for p, b, loop in zip(prompts, budgets, used)]
    assert outputs == expected
    # 4 distinct prompts at 4 loops (lengths 3, 11, 25, 40): at most 3 rows a pass, by length: 3 + 1; one at 2 loops
    assert sorted(passes) == [1, 1, 3]
    assert engine.prefills_total == 5


def test_engine_joins_mid_generation_match_library(model) -> None:  # noqa: ANN001
    """Rows join a running batch at whatever point it has reached and leave it; every row gets
    exactly the tokens `generate` gives it alone, for each loop configuration."""
    engine = Engine(model, max_context=256, max_batch=8).start()
    lengths, budgets = [60, 4, 30, 9, 17, 2, 40], [2, 8, 12, 6, 14, 10, 16]
    prompts = [[5 + (7 * i + j) % 250 for j in range(n)] for i, n in enumerate(lengths)]
    try:
        for options in LOOP_OPTIONS:
            loop = engine.loop_config(**options)
            outputs, done = [[] for _ in prompts], [threading.Event() for _ in prompts]
            for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
                def on_event(event, i=i, outputs=outputs, done=done) -> None:  # noqa: ANN001
                    if event.kind == "token":
                        outputs[i].append(event.token)
                    else:
                        done[i].set()
                engine.submit(Sequence(prompt, budget, loop, SamplingParams(), None, frozenset(), on_event))
                time.sleep(0.01)  # let earlier rows decode before the next one joins
            assert all(d.wait(60) for d in done)
            expected = [model.generate(p, b, eos_token_ids=[], steps=loop.steps, exit_policy=loop.exit_policy,
                                       exit_threshold=loop.exit_threshold, kv_mode=loop.kv_mode,
                                       skip_compute=loop.skip_compute)[0] for p, b in zip(prompts, budgets)]
            assert outputs == expected, options
        assert engine.running == 0 and engine.peak_running > 1
    finally:
        engine.stop()


def test_one_rows_failing_sampler_fails_only_that_row(model, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """A request whose sampling raises gets an error event; the rows decoding beside it go on to
    the tokens they get alone (it used to fail the whole decode batch with it)."""
    from looplm.server import engine as engine_module

    class Failing(engine_module.TokenChooser):
        calls = 0

        def __call__(self, logits: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.params.temperature == 0.7 and self.calls == 2:  # in a decode step, not the prefill
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
            return super().__call__(logits)

    monkeypatch.setattr(engine_module, "TokenChooser", Failing)
    engine = Engine(model, max_context=256, max_batch=8).start()
    try:
        steady, steady_done, _ = _collect(engine, [5, 6, 7, 8], 24)
        while not steady:  # decoding: the failing row joins its batch
            time.sleep(0.005)
        events: list = []
        failing_done = threading.Event()

        def on_event(event) -> None:  # noqa: ANN001
            events.append(event)
            if event.kind in ("done", "error"):
                failing_done.set()

        engine.submit(Sequence([9, 10, 11], 24, engine.loop_config(), SamplingParams(temperature=0.7), None,
                               frozenset(), on_event))
        assert failing_done.wait(60) and steady_done.wait(60)
        assert [e.kind for e in events] == ["token", "error"] and "sampling failed" in events[1].message
        assert steady == model.generate([5, 6, 7, 8], 24, eos_token_ids=[])[0]
        assert engine.running == 0
    finally:
        engine.stop()


def test_a_row_with_nan_or_infinite_logits_fails_alone(model) -> None:  # noqa: ANN001
    """Broken weights (or a numeric blow-up in one row) give NaN logits: the greedy fast path
    picked a token from them anyway, and sampling failed in torch.multinomial. Now such a row,
    greedy or sampled, gets one error event and the others their tokens."""
    from looplm.sampling import BAD_LOGITS, TokenChooser

    engine = Engine(model, max_context=256)  # not started: only its sampling step runs
    events: dict[int, list] = {}
    rows = []
    for i, params in enumerate([SamplingParams(), SamplingParams(), SamplingParams(temperature=0.7),
                                SamplingParams(temperature=0.7), SamplingParams(repetition_penalty=1.5)]):
        seq = Sequence([5], 4, engine.loop_config(), params, None, frozenset(), events.setdefault(i, []).append)
        seq.chooser = TokenChooser(params, torch.Generator().manual_seed(0))
        rows.append(seq)
    logits = torch.zeros(5, 300)
    logits[:, 7] = 30.0  # every usable row's likeliest token by far
    logits[0, 9] = float("-inf")  # a token ruled out is fine
    logits[1, 3] = float("nan")
    logits[3, 4] = float("inf")
    logits[4] = float("-inf")  # no token left to choose
    assert engine._sample(rows, logits) == [7, None, 7, None, None]
    assert events[0] == events[2] == []
    for i in (1, 3, 4):
        assert [(e.kind, e.message) for e in events[i]] == [("error", f"sampling failed: {BAD_LOGITS}")]


class Row:
    def __init__(self, budget: int) -> None:
        self.start = self.next_position = self.last_token = 0
        self.remaining, self.tokens = budget, []


@pytest.mark.parametrize("options", LOOP_OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_batch_pads_shifts_swaps_and_compacts(model, options) -> None:  # noqa: ANN001
    """Drive one Batch by hand through every buffer move, deterministically."""
    loop = Engine(model).loop_config(**options)
    batch = Batch(model, loop, max_width=256)
    prompts = {"a": list(range(10, 70)), "b": [7, 8, 9], "c": list(range(100, 120)), "d": [40, 41]}
    budgets = {"a": 2, "b": 12, "c": 6, "d": 5}
    rows = {name: Row(budgets[name]) for name in prompts}
    moves: list[int] = []
    shift = batch._shift
    batch._shift = lambda offset: (moves.append(offset), shift(offset))[1]

    def add(*names: str) -> None:  # several names: prefilled together, left-padded
        prefill = prefill_prompts(model, loop.steps, batch.policy, [prompts[name] for name in names])
        for index, name in enumerate(names):
            row = rows[name]
            row.last_token = int(prefill.logits[index].argmax(-1))
            row.tokens.append(row.last_token)
            row.remaining -= 1
            batch.join(row, prefill, index)

    def step() -> None:
        logits, _ = batch.decode()
        for row, token in zip(list(batch.rows), logits.argmax(-1).tolist()):
            row.last_token = token
            row.tokens.append(token)
            row.remaining -= 1
            if row.remaining == 0:
                batch.leave(row)

    with torch.inference_mode():
        add("a")
        add("b", "d")  # one prefill for both; b, shorter than a, is left-padded into [57, 60)
        # d is the third row, so that a leaves from the middle of the buffer (row swap)
        step()  # a is done and leaves: b and d start at >= 57, so the batch compacts
        assert moves and moves[-1] < 0, moves
        step()
        add("c")  # longer than the batch: everyone moves right
        assert moves[-1] > 0, moves
        while batch.rows:
            step()
    for name, row in rows.items():
        expected = model.generate(prompts[name], budgets[name], eos_token_ids=[], steps=loop.steps,
                                  exit_policy=loop.exit_policy, exit_threshold=loop.exit_threshold,
                                  kv_mode=loop.kv_mode, skip_compute=loop.skip_compute)[0]
        assert row.tokens == expected, name


def test_cancel_mid_stream_frees_the_row(server, client) -> None:  # noqa: ANN001
    engine = engine_of(server)
    before = engine.tokens_total
    stream = chat(client, "go on forever", max_tokens=400, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0
    assert engine.tokens_total - before < 400
    # A non-streaming client that gives up is cancelled too.
    slow = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=0.2)
    before = engine.tokens_total
    with pytest.raises(openai.APITimeoutError):
        slow.completions.create(model=NAME, prompt="a", max_tokens=500, temperature=0, extra_body={"loops": 8})
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0 and engine.tokens_total - before < 500
    assert chat(client, "still there?", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def scripted(model, script: list[int], prompt_len: int):  # noqa: ANN001, ANN201
    """The model, but every new token is `script[k]`: the real passes run (cache, batching), the logits are replaced."""
    readout, decode_step = model.readout, model.decode_step

    def one_hot(indices: list[int]) -> torch.Tensor:
        logits = torch.full((len(indices), model.config.vocab_size), -1e4)
        logits[range(len(indices)), [script[min(k, len(script) - 1)] for k in indices]] = 1e4
        return logits

    def fake_readout(out, policy, position=-1):  # noqa: ANN001, ANN202
        _, exit_step = readout(out, policy, position)
        return one_hot([0] * exit_step.shape[0]), exit_step

    def fake_decode_step(token_ids, positions, *args, **kwargs):  # noqa: ANN001, ANN202
        _, exit_step = decode_step(token_ids, positions, *args, **kwargs)
        return one_hot([int(p) - prompt_len + 1 for p in positions[:, 0]]), exit_step

    model.readout, model.decode_step = fake_readout, fake_decode_step
    return model


def test_reasoning_split(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOPLM_HOME", str(tmp_path_factory.mktemp("home")))
        model = looplm.load(dtype="float32")
    tok = model.tokenizer
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt_len = len(tok.encode(tok.apply_chat_template(messages)))
    # Byte-level tokens: every tag is split over several tokens.
    script = tok.encode("<think>\nTwo and two.\n</think>\n\nIt is 4.") + [tok.eos_id]
    scripted(model, script, prompt_len)
    with ServerThread(build_app(model, NAME, max_context=256)) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=64, temperature=0)
        message = whole.choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == ("Two and two.", "It is 4.")
        assert whole.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=64, temperature=0,
                                                      stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        assert (reasoning, content) == ("\nTwo and two.\n", "\n\nIt is 4.")
        assert len([d for d in deltas if (d.model_extra or {}).get("reasoning_content")]) > 1  # streamed, not at the end
        off = client.chat.completions.create(model=NAME, messages=messages, max_tokens=64, temperature=0,
                                             extra_body={"split_reasoning": False})
        assert off.choices[0].message.content == "<think>\nTwo and two.\n</think>\n\nIt is 4."


BAD_REQUESTS = [
    ("malformed json", "/v1/chat/completions", b"{not json", 400),
    ("not an object", "/v1/chat/completions", [1, 2], 400),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("no messages", "/v1/chat/completions", {"model": NAME}, 400),
    ("empty messages", "/v1/chat/completions", {"model": NAME, "messages": []}, 400),
    ("bad role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("negative temperature", "/v1/completions", {"model": NAME, "prompt": "a", "temperature": -1}, 400),
    ("top_p zero", "/v1/completions", {"model": NAME, "prompt": "a", "top_p": 0}, 400),
    ("max_tokens zero", "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400),
    ("beyond the context", "/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 100000}, 400),
    ("prompt beyond the context", "/v1/completions", {"model": NAME, "prompt": "a" * 600, "max_tokens": 1}, 400),
    ("loops 9", "/v1/completions", {"model": NAME, "prompt": "a", "loops": 9}, 400),
    ("unknown exit policy", "/v1/completions", {"model": NAME, "prompt": "a", "exit_policy": "nope"}, 400),
    ("threshold above 1", "/v1/completions", {"model": NAME, "prompt": "a", "exit_threshold": 1.5}, 400),
    ("unknown kv_mode", "/v1/completions", {"model": NAME, "prompt": "a", "kv_mode": "half"}, 400),
    ("n too large", "/v1/completions", {"model": NAME, "prompt": "a", "n": 20}, 400),
    ("five stop strings", "/v1/completions", {"model": NAME, "prompt": "a", "stop": list("abcde")}, 400),
    ("logprobs above 20", "/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 21}, 400),
    ("negative logprobs", "/v1/completions", {"model": NAME, "prompt": "a", "logprobs": -1}, 400),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400),
    ("tools", "/v1/chat/completions",
     {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400),
    ("prompt of wrong type", "/v1/completions", {"model": NAME, "prompt": {"x": 1}}, 400),
    ("json response_format", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                                       "response_format": {"type": "json_object"}}, 400),
    ("presence_penalty 3", "/v1/completions", {"model": NAME, "prompt": "a", "presence_penalty": 3}, 400),
    ("logit_bias past the vocab", "/v1/completions", {"model": NAME, "prompt": "a", "logit_bias": {"99999": 1}}, 400),
    ("logit_bias 101", "/v1/completions", {"model": NAME, "prompt": "a", "logit_bias": {"5": 101}}, 400),
    ("logit_bias key not an id", "/v1/completions", {"model": NAME, "prompt": "a", "logit_bias": {"x": 1}}, 400),
    ("repetition_penalty 0", "/v1/completions", {"model": NAME, "prompt": "a", "repetition_penalty": 0}, 400),
    ("seed past int64", "/v1/completions", {"model": NAME, "prompt": "a", "seed": 2**64}, 400),
    ("min_p above 1", "/v1/completions", {"model": NAME, "prompt": "a", "min_p": 1.5}, 400),
    ("vllm min_tokens", "/v1/completions", {"model": NAME, "prompt": "a", "min_tokens": 3}, 400),
    ("completion suffix", "/v1/completions", {"model": NAME, "prompt": "def f(", "suffix": "return x"}, 400),
    ("stop_token_ids past the vocab", "/v1/completions", {"model": NAME, "prompt": "a", "stop_token_ids": [99999]},
     400),
    ("vllm guided_json", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                                  "guided_json": {"type": "object"}}, 400),
    ("tool_choice auto", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                                  "tool_choice": "auto"}, 400),
    ("unknown route", "/v1/embeddings", {"model": NAME, "input": "a"}, 404),
    # JSON may spell a lone surrogate, which is no Unicode text (the tokenizer raised a TypeError: a 500)
    ("lone surrogate in a prompt", "/v1/completions", b'{"prompt": "hi \\ud800 there", "max_tokens": 2}', 400),
    ("lone surrogate in a message", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\udfff"}], "stream": true}', 400),
    ("lone surrogate to tokenize", "/tokenize", b'{"prompt": "\\ud800"}', 400),
]


@pytest.mark.parametrize("name,route,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, name, route, body, status) -> None:  # noqa: ANN001
    content = body if isinstance(body, bytes) else None
    response = httpx.post(server.url + route, content=content, json=None if content else body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]


@pytest.mark.parametrize("prompt", [{"x": 1}, [1.5, 5], ["a", [5]], [True, 5], [[5], "a"], 7])
def test_a_prompt_of_the_wrong_shape_gets_one_message(server, prompt) -> None:  # noqa: ANN001
    response = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": prompt}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "prompt: give a string, a list of strings, a list of token ids or a list of token-id lists")


def test_a_text_that_cannot_fit_is_refused_before_tokenizing(server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The tokenizer holds the GIL: a 10 MB prompt stalled the event loop (every stream) for
    seconds. No token is longer than 25 bytes in this tokenizer, so 60 000 characters cannot fit
    512 positions: a 400 without a call to the tokenizer. A prompt near the limit is tokenized."""
    tok = engine_of(server).model.tokenizer
    encoded = []
    monkeypatch.setattr(type(tok), "encode", lambda self, text, *a: encoded.append(len(text)) or [5])
    for route, body in [("/v1/completions", {"prompt": "hello " * 10_000}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 10_000}]}),
                        ("/tokenize", {"prompt": "hello " * 10_000})]:
        response = httpx.post(server.url + route, json=body, timeout=30)
        assert response.status_code == 400, route
        assert "cannot fit the context of 512 tokens" in response.json()["error"]["message"]
    assert encoded == []
    assert httpx.post(server.url + "/tokenize", json={"prompt": "hello " * 4_000}, timeout=30).status_code == 200
    assert encoded == [24_000]


def test_developer_messages_are_system_messages(client) -> None:  # noqa: ANN001
    def ask(role: str) -> str:
        messages = [{"role": role, "content": "Answer in verse."}, {"role": "user", "content": "hi"}]
        return client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)

    assert ask("developer").choices[0].message.content == ask("system").choices[0].message.content
    assert ask("developer").usage.prompt_tokens == ask("system").usage.prompt_tokens


def test_metrics_label_requests_by_route_template(server) -> None:  # noqa: ANN001
    """Labels come from the routes, not the path a client sends: random paths would grow the
    page (and the server's memory) without bound."""
    for path in ("/v1/zz12345", "/v1/zz54321", "/v1/models/x-98765"):
        httpx.get(server.url + path, timeout=30)
    text = httpx.get(server.url + "/metrics").text
    assert "zz12345" not in text and "98765" not in text
    assert 'route="other",status="404"' in text
    assert 'route="/v1/models/{model_id:path}",status="404"' in text


def test_options_at_their_off_values_are_accepted(server) -> None:  # noqa: ANN001
    """Clients that send vLLM's or OpenAI's extras at their defaults are served; other values get a 400."""
    body = {"model": NAME, "prompt": "a", "max_tokens": 2, "repetition_penalty": 1.0, "min_p": 0, "best_of": 1,
            "tool_choice": "none", "tools": [], "response_format": {"type": "text"},
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 200
    refused = httpx.post(server.url + "/v1/completions", json={**body, "min_tokens": 4}, timeout=30)
    assert refused.json()["error"]["message"] == "min_tokens 4 is not supported by looplm"


def test_a_request_without_a_model_is_served_by_the_served_model(server) -> None:  # noqa: ANN001
    """As in vLLM: `curl` users need not know the served name; a wrong name is still a 404."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 3}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == NAME
    named = httpx.post(server.url + "/v1/chat/completions", json={**body, "model": NAME}, timeout=30).json()
    assert named["choices"][0]["message"] == response.json()["choices"][0]["message"]


def test_errors_through_the_client_and_the_server_survives(server, client) -> None:  # noqa: ANN001
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", max_tokens=100000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a")
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    assert httpx.get(server.url + "/health").status_code == 200


def test_full_queue_answers_429_and_api_key(model) -> None:  # noqa: ANN001
    engine = Engine(model, max_context=64, max_queue=1)  # never started: the queue only fills
    engine.submit(Sequence([5, 6], 4, engine.loop_config(), SamplingParams(), None, frozenset(), lambda e: None))
    with ServerThread(create_app(engine, NAME, api_key="secret", manage_engine=False)) as running:
        body = {"model": NAME, "prompt": "a", "max_tokens": 2}
        assert httpx.post(running.url + "/v1/completions", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(running.url + "/v1/completions", json=body, headers=wrong).status_code == 401
        good = {"Authorization": "Bearer secret"}
        response = httpx.post(running.url + "/v1/completions", json=body, headers=good)
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "queue_full"
        lower = {"Authorization": "bearer secret"}  # the scheme is case-insensitive, the key is not
        assert httpx.post(running.url + "/v1/completions", json=body, headers=lower).status_code == 429
        assert httpx.post(running.url + "/v1/completions", json=body,
                          headers={"Authorization": "Bearer SECRET"}).status_code == 401
        assert httpx.post(running.url + "/v1/completions", json=body,
                          headers={"Authorization": "Basic secret"}).status_code == 401
        # No key needed outside /v1 (a 503, not a 401: this engine was never started).
        assert httpx.get(running.url + "/health").status_code == 503
        assert httpx.head(running.url + "/health").status_code == 503
        # More sequences than the queue holds can never be queued: a 400, not a 429 to retry.
        for more in ({**body, "n": 2}, {**body, "prompt": ["a", "b"]}):
            response = httpx.post(running.url + "/v1/completions", json=more, headers=good)
            assert response.status_code == 400 and "queues at most 1 at once" in response.json()["error"]["message"]


def test_looplm_serve_command(tmp_path) -> None:  # noqa: ANN001
    """The CLI end to end: `looplm serve` in a subprocess, on loopback, answering the client."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LOOPLM_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "looplm", "serve", "--port", str(port), "--threads", "1", "--max-context", "128",
               "--served-model-name", "tiny"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 180  # startup only; generous for a loaded CI machine
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                assert [m.id for m in client.models.list().data] == ["tiny"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "looplm serve did not come up"
                time.sleep(0.2)
        reply = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError):  # --max-context is enforced
            client.completions.create(model="tiny", prompt="hi", max_tokens=200)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_stop_signal_ends_running_streams_and_the_process(tmp_path) -> None:  # noqa: ANN001
    """SIGTERM (or Ctrl-C) during a long stream: uvicorn waits for open connections before the app
    and its engine shut down, so the server kept streaming for minutes (and a second Ctrl-C
    aborted it). Now the stream ends with an error event and [DONE], and the process exits."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LOOPLM_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "looplm", "serve", "--port", str(port), "--threads", "1", "--max-context", "4096"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # startup only
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "looplm serve did not come up"
                time.sleep(0.2)
        body = {"prompt": "ROMEO:", "max_tokens": 4000, "stream": True, "ignore_eos": True, "loops": 8}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3:
                    process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) is not None
        assert events[-1] == "[DONE]" and "shutting down" in events[-2]
        assert len(events) < 1000  # it stopped, it did not finish 4000 tokens
    finally:
        process.kill()
        process.wait(timeout=30)


def test_serve_listens_before_loading_and_refuses_an_empty_api_key() -> None:
    """Two servers started at once on one port both bound it (SO_REUSEADDR) and the second died in
    uvicorn's listen after loading its model; an empty key turned authentication off."""
    import socket

    from typer.testing import CliRunner

    from looplm.cli import app
    from looplm.cli.serve import _listen
    from looplm.errors import LooplmError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = _listen("127.0.0.1", port)
    try:
        with pytest.raises(LooplmError, match=f"cannot listen on 127.0.0.1:{port}"):
            _listen("127.0.0.1", port)
    finally:
        first.close()
    with pytest.raises(LooplmError, match="is not a valid host name"):
        _listen("a..b", 8000)
    for key in ("", "  "):
        result = CliRunner().invoke(app, ["serve", "--api-key", key, "--port", "1"])
        assert result.exit_code == 1 and "--api-key (or $LOOPLM_API_KEY) is empty" in result.output


def test_prefill_chunks_group_by_length_within_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from looplm.server import engine as engine_module

    monkeypatch.setattr(engine_module, "PREFILL_ROWS", 3)

    def seq(n: int, fill: int = 1) -> Sequence:
        return Sequence([fill] * n, 1, None, SamplingParams(), None, frozenset(), lambda e: None)

    long = [seq(50), seq(50)]  # longer than the budget: one pass, which its two choices share
    short = [seq(5, 1), seq(9, 2), seq(12, 3), seq(4, 4), seq(5, 1)]
    chunks = engine_module._prefill_chunks(short + long, 40)
    lengths = [[len(s.prompt_ids) for s in chunk] for chunk in chunks]
    assert lengths == [[4, 5, 5, 9], [12], [50, 50]]  # by length; 3 distinct prompts a pass at most


def _collect(engine: Engine, prompt: list[int], budget: int, log: list | None = None, name: str = "",
             **fields: object) -> tuple[list[int], threading.Event, list]:
    """Submit one sequence; returns its token list, a done event and its prompt log-probabilities."""
    tokens: list[int] = []
    prompt_logprobs: list = []
    done = threading.Event()

    def on_event(event) -> None:  # noqa: ANN001
        if event.kind == "token":
            tokens.append(event.token)
            if log is not None:
                log.append(name)
        elif event.kind == "prompt":
            prompt_logprobs.extend(event.prompt_logprobs)
        else:
            done.set()

    engine.submit(Sequence(prompt, budget, engine.loop_config(), SamplingParams(), None, frozenset(), on_event,
                           **fields))
    return tokens, done, prompt_logprobs


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(model,  # noqa: ANN001
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With prefill_chunk 8, a 45-token prompt takes six passes; the running request gets tokens
    in between, and both get exactly the tokens they get alone."""
    from looplm.server import batch as batch_module

    order: list[str] = []
    real = batch_module.ChunkedPrefill.advance

    def logged(self, tokens: int):  # noqa: ANN001, ANN202
        order.append("chunk")
        return real(self, tokens)

    monkeypatch.setattr(batch_module.ChunkedPrefill, "advance", logged)
    engine = Engine(model, max_context=256, prefill_chunk=8).start()
    short_prompt, long_prompt = [11, 12, 13, 14, 15], [20 + (7 * j) % 200 for j in range(45)]
    try:
        short, short_done, _ = _collect(engine, short_prompt, 30, order, "short")
        while not short:  # the short request is decoding before the long one arrives
            time.sleep(0.005)
        long, long_done, _ = _collect(engine, long_prompt, 6, order, "long")
        assert short_done.wait(60) and long_done.wait(60)
    finally:
        engine.stop()
    assert order.count("chunk") == 6  # ceil(45 / 8)
    first, last = order.index("chunk"), len(order) - 1 - order[::-1].index("chunk")
    assert "short" in order[first:last]  # decoding went on between the chunks
    assert short == model.generate(short_prompt, 30, eos_token_ids=[])[0]
    assert long == model.generate(long_prompt, 6, eos_token_ids=[])[0]
    assert engine.prefilling == 0 and engine.running == 0


def test_chunked_echo_logprobs_equal_the_whole_prompts(model) -> None:  # noqa: ANN001
    prompt = [30 + (13 * j) % 200 for j in range(37)]
    results = []
    for chunk in (256, 8):
        engine = Engine(model, max_context=256, prefill_chunk=chunk).start()
        engine_busy = _collect(engine, [5, 6, 7], 40)  # something decoding, so that the prompt is chunked
        try:
            _, done, logprobs = _collect(engine, prompt, 0, echo_logprobs=True, logprobs=0)
            assert done.wait(60) and engine_busy[1].wait(60)
        finally:
            engine.stop()
        results.append(logprobs)
    whole, chunked = results
    assert [e.token for e in chunked] == prompt and chunked[0].logprob is None
    assert max(abs(a.logprob - b.logprob) for a, b in zip(whole[1:], chunked[1:])) < 1e-4


def test_cancelling_a_request_during_its_chunked_prefill(model) -> None:  # noqa: ANN001
    engine = Engine(model, max_context=256, prefill_chunk=4).start()
    try:
        busy, busy_done, _ = _collect(engine, [5, 6, 7], 60)
        while not busy:
            time.sleep(0.005)
        events: list = []
        seq = Sequence([40 + j for j in range(60)], 5, engine.loop_config(), SamplingParams(), None, frozenset(),
                       events.append)
        engine.submit(seq)
        time.sleep(0.02)
        engine.cancel(seq)
        assert busy_done.wait(60)
        deadline = time.time() + 10
        while engine.prefilling and time.time() < deadline:
            time.sleep(0.01)
        assert engine.prefilling == 0 and not any(e.kind == "error" for e in events)
    finally:
        engine.stop()


def test_without_max_tokens_each_prompt_may_fill_the_rest_of_the_context(model) -> None:  # noqa: ANN001
    """A batch of prompts without max_tokens: each one's budget is its own rest of the context,
    not the longest prompt's; a prompt that fills the context says so, not "max_tokens (1)"."""
    from fastapi.testclient import TestClient

    with TestClient(build_app(model, NAME, max_context=64, max_batch=4)) as http:
        reply = http.post("/v1/completions", json={"model": NAME, "prompt": [[5] * 10, [5] * 60], "temperature": 0,
                                                   "ignore_eos": True}).json()
        lengths = {choice["index"]: choice["finish_reason"] for choice in reply["choices"]}
        assert lengths == {0: "length", 1: "length"} and reply["usage"]["completion_tokens"] == (64 - 10) + (64 - 60)
        full = http.post("/v1/completions", json={"model": NAME, "prompt": [[5] * 64]})
        assert full.status_code == 400
        assert "fills the server's context of 64 tokens" in full.json()["error"]["message"]


@pytest.mark.parametrize("failing", ["looplm.server.prefix_store.PrefixStore.put", "looplm.server.batch.Batch.leave"])
def test_a_failure_while_a_row_leaves_does_not_stop_the_engine(model, monkeypatch: pytest.MonkeyPatch,
                                                                failing: str) -> None:  # noqa: ANN001
    """An allocation failure copying a finished row's K/V (into the prefix store, or compacting the
    batch) once killed the worker thread: later requests hung while /health said ok. Now the store
    is skipped, or the sequences still in flight get an error, and the next requests are answered."""
    from fastapi.testclient import TestClient

    module_path, cls_name, method = failing.rsplit(".", 2)
    cls = getattr(__import__(module_path, fromlist=[cls_name]), cls_name)
    real, calls = getattr(cls, method), []

    def fail_once(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, fail_once)
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    with TestClient(build_app(model, NAME, max_context=256)) as http:
        first = http.post("/v1/completions", json=body)
        assert first.status_code == 200  # the row had its answer before it left
        for _ in range(2):
            reply = http.post("/v1/completions", json=body)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4
        assert http.get("/health").json()["status"] == "ok"
    assert calls


def test_health_says_so_when_the_engine_has_stopped(model) -> None:  # noqa: ANN001
    from fastapi.testclient import TestClient

    app = build_app(model, NAME, max_context=256)
    with TestClient(app) as http:
        app.state.engine.stop()
        reply = http.get("/health")
        assert reply.status_code == 503 and reply.json()["status"] == "engine stopped"
