"""A fixed list of generations run through one serving engine, without a server.

For callers that have every prompt up front (`looplm eval`, lm-eval's `generate_until`): the
engine batches them continuously (a finished row takes the next prompt at once, instead of
waiting for the longest answer of a static batch) and, with a prefix budget, keeps finished
K/V for prompts that start the same way (few-shot examples). Every job is queued before the
engine starts, so the batching, and with it a bf16 run's rounding, is the same each run.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass, field

from looplm.errors import LooplmError
from looplm.generate import hits_stop
from looplm.sampling import SamplingParams
from looplm.server.engine import Engine, Event, Sequence


@dataclass
class Job:
    prompt: list[int]
    max_new_tokens: int
    steps: int | None = None  # None: the config's loop count
    exit_policy: str | None = None
    exit_threshold: float | None = None
    kv_mode: str = "full"
    skip_compute: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)  # greedy by default
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need the model's tokenizer)


@dataclass
class JobResult:
    index: int  # the job's place in the list given
    tokens: list[int]  # new ids, ending with the eos id or the token that completed a stop string
    loops: list[int]  # 1-based UT step each token was read from (with skip_compute: the loops run)


def run_jobs(model, jobs: list[Job], max_batch: int = 8, prefix_cache_bytes: int = 0) -> Iterator[JobResult]:  # noqa: ANN001
    """Yield each job's result as it finishes. Bad jobs (a prompt too long for the context, a bad
    loop setting) raise a LooplmError before anything runs; a failed step raises one after."""
    if any(job.stop for job in jobs) and model.tokenizer is None:
        raise LooplmError("stop strings need a tokenizer, and this model was loaded without one")
    eos = model.stop_ids
    engine = Engine(model, max_context=model.config.max_position_embeddings, max_batch=max_batch,
                    max_queue=max(1, len(jobs)), prefix_cache_bytes=prefix_cache_bytes)
    finished: queue.Queue[tuple[JobResult, str | None]] = queue.Queue()
    for index, job in enumerate(jobs):
        loop = engine.loop_config(job.steps, job.exit_policy, job.exit_threshold, job.kv_mode, job.skip_compute)
        receiver = _Receiver(model, engine, job, JobResult(index, [], []), finished)
        receiver.sequence = engine.submit(Sequence(job.prompt, job.max_new_tokens, loop, job.sampling, job.seed, eos,
                                                   receiver.on_event))
    engine.start()
    try:
        for _ in jobs:
            result, error = finished.get()
            if error is not None:
                raise LooplmError(f"generation failed: {error}")
            yield result
    finally:
        engine.stop()


class _Receiver:
    """One job's events, on the engine thread: tokens are collected until the sequence ends or a
    stop string appears (then the sequence is cancelled, freeing its row), and the result is
    handed to the waiting caller once."""

    def __init__(self, model, engine: Engine, job: Job, result: JobResult,  # noqa: ANN001
                 finished: queue.Queue[tuple[JobResult, str | None]]) -> None:
        self.model, self.engine, self.job, self.result, self.finished = model, engine, job, result, finished
        self.sequence: Sequence | None = None  # set once submitted
        self.closed = False

    def on_event(self, event: Event) -> None:
        if self.closed:
            return
        if event.kind == "token":
            self.result.tokens.append(event.token)
            self.result.loops.append(event.loops)
            if hits_stop(self.model, self.result.tokens, list(self.job.stop)):
                self.engine.cancel(self.sequence)  # nothing more is read from it
                self._close(None)
        elif event.kind in ("done", "error"):
            self._close(event.message if event.kind == "error" else None)

    def _close(self, error: str | None) -> None:
        self.closed = True
        self.finished.put((self.result, error))


__all__ = ["Job", "JobResult", "run_jobs"]
