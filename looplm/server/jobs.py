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
    from looplm.generate import hits_stop

    if any(job.stop for job in jobs) and model.tokenizer is None:
        raise LooplmError("stop strings need a tokenizer, and this model was loaded without one")
    defaults = model.generation_defaults or {}
    eos = frozenset(defaults.get("eos_token_ids", model.config.eos_token_ids))
    engine = Engine(model, max_context=model.config.max_position_embeddings, max_batch=max_batch,
                    max_queue=max(1, len(jobs)), prefix_cache_bytes=prefix_cache_bytes)
    finished: queue.Queue[tuple[JobResult, str | None]] = queue.Queue()

    def receiver(index: int, job: Job):  # noqa: ANN202 - called on the engine thread with each event
        result, closed, sequence = JobResult(index, [], []), [], []

        def on_event(event: Event) -> None:
            if closed:
                return
            if event.kind == "token":
                result.tokens.append(event.token)
                result.loops.append(event.loops)
                if hits_stop(model, result.tokens, list(job.stop)):
                    closed.append(True)
                    engine.cancel(sequence[0])  # frees its row; nothing more is read from it
                    finished.put((result, None))
            elif event.kind in ("done", "error"):
                closed.append(True)
                finished.put((result, event.message if event.kind == "error" else None))

        return on_event, sequence

    for index, job in enumerate(jobs):
        loop = engine.loop_config(job.steps, job.exit_policy, job.exit_threshold, job.kv_mode, job.skip_compute)
        on_event, holder = receiver(index, job)
        holder.append(engine.submit(Sequence(job.prompt, job.max_new_tokens, loop, job.sampling, job.seed, eos,
                                             on_event)))
    engine.start()
    try:
        for _ in jobs:
            result, error = finished.get()
            if error is not None:
                raise LooplmError(f"generation failed: {error}")
            yield result
    finally:
        engine.stop()


__all__ = ["Job", "JobResult", "run_jobs"]
