"""`looplm.server.jobs.run_jobs`: a fixed list of generations through one engine, as generate gives them."""

from __future__ import annotations

import pytest
from conftest import random_prompts

import looplm
from looplm.errors import LooplmError
from looplm.generate import generate
from looplm.sampling import SamplingParams
from looplm.server.jobs import Job, run_jobs


@pytest.fixture(scope="module")
def embedded():  # noqa: ANN201
    return looplm.load(dtype="float32")


def test_jobs_of_mixed_loop_settings_give_generates_tokens_and_loops(make_checkpoint) -> None:  # noqa: ANN001
    model = looplm.load(make_checkpoint(seed=5, num_key_value_heads=2), dtype="float32")
    prompts = random_prompts(model.config.vocab_size, [5, 11, 3, 8, 6, 9], seed=1)
    settings = [dict(steps=4), dict(steps=2, exit_policy="last"), dict(steps=4, exit_policy="gate", exit_threshold=0.5),
                dict(steps=4, exit_policy="gate", exit_threshold=0.5, skip_compute=True), dict(steps=3),
                dict(steps=4, kv_mode="shared")]
    jobs = [Job(prompt, 6 + i, **options) for i, (prompt, options) in enumerate(zip(prompts, settings))]
    results = list(run_jobs(model, jobs, max_batch=2))
    assert sorted(r.index for r in results) == list(range(len(jobs)))
    for result in results:
        job = jobs[result.index]
        tokens, stats = generate(model, job.prompt, job.max_new_tokens, steps=job.steps, exit_policy=job.exit_policy,
                                 exit_threshold=job.exit_threshold, kv_mode=job.kv_mode,
                                 skip_compute=job.skip_compute, return_stats=True)
        assert result.tokens == tokens[0], result.index
        assert result.loops == stats.steps_per_token[0], result.index


def test_a_stop_string_ends_its_job(embedded) -> None:  # noqa: ANN001
    tok = embedded.tokenizer
    prompt = tok.encode("Once upon a time")
    free = generate(embedded, prompt, 24)[0]
    text = tok.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = generate(embedded, prompt, 24, stop=[stop])[0]
    assert len(expected) < len(free)
    jobs = [Job(prompt, 24, stop=(stop,)), Job(prompt, 24), Job(tok.encode("The king"), 10, stop=(stop,))]
    results = {r.index: r for r in run_jobs(embedded, jobs, max_batch=1)}  # one row: the others wait for it
    assert results[0].tokens == expected and results[1].tokens == free
    assert results[2].tokens == generate(embedded, jobs[2].prompt, 10, stop=[stop])[0]


def test_seeded_sampling_is_the_same_every_run(embedded) -> None:  # noqa: ANN001
    prompt = embedded.tokenizer.encode("The")
    jobs = [Job(prompt, 12, sampling=SamplingParams(temperature=1.3), seed=seed) for seed in (1, 2, 1)]

    def run() -> list[list[int]]:
        return [r.tokens for r in sorted(run_jobs(embedded, jobs, max_batch=3), key=lambda r: r.index)]

    first = run()
    assert first == run() and first[0] == first[2] and first[0] != first[1]


def test_bad_jobs_fail_before_anything_runs(embedded) -> None:  # noqa: ANN001
    too_long = [5] * embedded.config.max_position_embeddings
    with pytest.raises(LooplmError, match="context"):
        list(run_jobs(embedded, [Job([5, 6], 4), Job(too_long, 4)]))
    with pytest.raises(LooplmError, match="loops must be in"):
        list(run_jobs(embedded, [Job([5, 6], 4, steps=99)]))
