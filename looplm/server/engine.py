"""The server's engine: one worker thread owns the model and batches every running request.

Works on token ids only; the HTTP side tokenizes, detokenizes and watches for stop strings.

The worker loops:
1. retire cancelled sequences (their rows leave the batch and the cache is reused);
2. admit waiting requests (up to `max_batch` running or prefilling) and run one prefill pass:
   the short prompts of one `LoopConfig` together (left-padded, by length, within
   `prefill_chunk` positions and PREFILL_ROWS prompts), or the next `prefill_chunk` tokens of a
   long prompt (`ChunkedPrefill`); a prefilled sequence's first token is sampled and it joins a
   batch with the same `LoopConfig` (or starts a new batch);
3. run one decode step for every batch (round-robin over loop configurations), sample each
   row with its own sampling parameters and generator, hand the tokens over, and retire rows
   that hit an eos id or their token budget.

Hand-off: `submit` takes a callback that the worker calls with an `Event` for every token and
once at the end (`done` or `error`). The callback must be thread-safe and must not block (the
HTTP side uses `loop.call_soon_threadsafe`). The waiting queue is bounded: `submit` raises
`QueueFull` when it is full. No exception inside a step escapes the worker: the sequences
involved get an `error` event and the engine keeps serving.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from looplm.cpu_load import adjust_threads
from looplm.errors import GenerationError
from looplm.exit import POLICY_NAMES, check_exit_options
from looplm.generate import KV_MODES
from looplm.models.ouro import OuroForCausalLM
from looplm.sampling import BAD_LOGITS, SamplingParams, TokenChooser, make_generator, usable_rows
from looplm.server.batch import Batch, ChunkedPrefill, LoopConfig, Prefill, loop_policy, prefill_prompts
from looplm.server.prefix_store import PrefixStore

log = logging.getLogger("looplm.server")


class QueueFull(Exception):
    """The waiting queue is at capacity; the HTTP side answers 429."""


@dataclass
class TokenLogprob:
    """A generated token's log-probability and its likeliest alternatives `(token, log-prob)`, best
    first, under the model's own distribution at the step the token was read from (before
    temperature, top-k and top-p)."""

    token: int
    logprob: float | None  # None for a prompt's first token, which nothing precedes
    top: list[tuple[int, float]]


@dataclass
class Event:
    kind: str  # "prompt" | "token" | "done" | "error"
    token: int | None = None
    loops: int | None = None  # 1-based UT step the token was read from (with skip_compute: loops run)
    finish_reason: str | None = None  # on "done": "stop" (eos) | "length"
    message: str | None = None  # on "error"
    logprob: TokenLogprob | None = None  # on "token", when the sequence asked for `logprobs`
    prompt_logprobs: list[TokenLogprob] | None = None  # on "prompt" (`echo_logprobs`), before any token


@dataclass(eq=False)  # identity: a sequence is looked up in lists and sets
class Sequence:
    """One generation: a request's parameters plus its row state while it runs."""

    prompt_ids: list[int]
    max_tokens: int
    loop: LoopConfig
    sampling: SamplingParams
    seed: int | None
    eos_ids: frozenset[int]
    on_event: Callable[[Event], None]
    logprobs: int | None = None  # None: no log-probabilities; k: each token's and the top k alternatives
    echo_logprobs: bool = False  # also the prompt tokens' log-probabilities (a "prompt" event); max_tokens may be 0
    id: int = 0
    generator: torch.Generator | None = None
    chooser: TokenChooser | None = None  # set by `Engine.submit`; keeps the counts the penalties need
    cancelled: bool = False
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # the tokens handed over so far
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix store
    start: int = 0  # first buffer column of this row in its batch
    next_position: int = 0  # RoPE position of the next token fed in
    last_token: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)

    @property
    def remaining(self) -> int:
        return self.max_tokens - self.generated


class Engine:
    def __init__(self, model: OuroForCausalLM, max_context: int = 2048, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 256, prefix_cache_bytes: int = 0) -> None:
        limit = model.config.max_position_embeddings
        if not 1 < max_context <= limit:
            raise GenerationError(f"max_context must be in [2, {limit}] (the model's context), got {max_context}")
        if max_batch < 1 or max_queue < 1:
            raise GenerationError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        if prefill_chunk < 1:
            raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model, self.max_context, self.max_batch, self.max_queue = model, max_context, max_batch, max_queue
        # Prompt positions one prefill pass runs while batches are decoding: a longer prompt is
        # prefilled in chunks of this size, a round of short ones in passes of at most this many.
        self.prefill_chunk = prefill_chunk
        # Finished sequences' K/V, for prompts that start the same way (a chat's next turn); 0: off.
        self.prefix_store = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.batches: list[Batch] = []
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._ready: list[Sequence] = []  # admitted (they hold a place in max_batch), not prefilled yet
        self._chunked: list[tuple[ChunkedPrefill, list[Sequence]]] = []  # long prompts, and who waits on each
        self._chunk_turn = False  # short and long prompts take turns for the one prefill pass of a round
        self._cancelled: set[Sequence] = set()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Counters for /metrics (written by the worker only).
        self.tokens_total = 0
        self.loops_total = 0
        self.prompt_tokens_total = 0
        self.decode_steps_total = 0
        self.prefills_total = 0  # prompt passes run (one per request prompt, however many choices)
        self.cached_prompt_tokens_total = 0  # prompt tokens taken from the prefix store, once per prompt pass
        self.peak_running = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="looplm-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs (it was started and has not ended)."""
        return self._thread is not None and self._thread.is_alive()

    def request_stop(self) -> None:
        """Stop after the current step without waiting: every sequence still queued or running gets
        an error event ("the server is shutting down"), which ends its stream."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- requests (any thread) ------------------------------------------------------------------

    def loop_config(
        self,
        loops: int | None = None,
        exit_policy: str | None = None,
        exit_threshold: float | None = None,
        kv_mode: str = "full",
        skip_compute: bool = False,
    ) -> LoopConfig:
        """Check a request's loop options; raises `GenerationError` naming the bad one."""
        most = self.model.config.max_steps
        if loops is not None and not 1 <= loops <= most:
            raise GenerationError(f"loops must be in [1, {most}], got {loops}")
        if exit_policy is not None and exit_policy not in POLICY_NAMES:
            raise GenerationError(f"exit_policy must be one of {', '.join(POLICY_NAMES)}, got {exit_policy!r}")
        check_exit_options(exit_policy, exit_threshold)
        if kv_mode not in KV_MODES:
            raise GenerationError(f"kv_mode must be one of {', '.join(KV_MODES)}, got {kv_mode!r}")
        steps = self.model.config.total_ut_steps if loops is None else loops
        return LoopConfig(steps, exit_policy, exit_threshold, kv_mode, bool(skip_compute))

    def check_length(self, prompt_len: int, max_tokens: int | None) -> None:
        """`max_tokens=None`: the request takes the rest of the context, which must hold one token."""
        if prompt_len < 1:
            raise GenerationError("the prompt is empty: give at least one token")
        if max_tokens is None and prompt_len >= self.max_context:
            raise GenerationError(f"the prompt ({prompt_len} tokens) fills the server's context of "
                                  f"{self.max_context} tokens and leaves no room for a completion; shorten it")
        if prompt_len + (max_tokens or 0) > self.max_context:
            raise GenerationError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the server's context of "
                f"{self.max_context} tokens; shorten the prompt or lower max_tokens"
            )

    def submit(self, seq: Sequence) -> Sequence:
        self.check_length(len(seq.prompt_ids), seq.max_tokens)
        vocab = self.model.config.vocab_size
        if min(seq.prompt_ids) < 0 or max(seq.prompt_ids) >= vocab:
            raise GenerationError(f"token ids must be in [0, {vocab})")
        seq.sampling.check_vocab(vocab)
        seq.generator = make_generator(seq.seed, seq.sampling.greedy, self.model.device)
        prompt = torch.tensor([seq.prompt_ids]) if seq.sampling.repetition_penalty != 1 else None
        seq.chooser = TokenChooser(seq.sampling, seq.generator, prompt)
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            seq.id = next(self._ids)
            self._waiting.append(seq)
            self._wake.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (client gone, or a stop string seen); its row and cache are freed."""
        with self._wake:
            if seq.cancelled:
                return
            seq.cancelled = True
            try:
                self._waiting.remove(seq)
            except ValueError:
                self._cancelled.add(seq)
            self._wake.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(len(batch.rows) for batch in self.batches)

    @property
    def prefilling(self) -> int:
        """Admitted sequences whose prompt is not fully prefilled yet."""
        return len(self._ready) + sum(len(seqs) for _, seqs in self._chunked)

    # -- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while (not self._stopping and not self._waiting and not self._cancelled and not self.running
                           and not self.prefilling):
                        self._wake.wait()
                    if self._stopping:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                try:
                    self._round(cancelled)
                except Exception as exc:  # e.g. out of memory while a row left its batch
                    # Each step guards its own failures; this is the net under everything else, so that
                    # one failure ends the sequences in flight with an error, never the worker.
                    log.exception("engine round failed")
                    self._fail_in_flight(f"the engine failed: {exc}")
        self._fail_all("the server is shutting down")

    def _round(self, cancelled: set[Sequence]) -> None:
        for seq in cancelled:
            self._retire(seq)
        adjust_threads()  # follows other processes' load, when the command chose the threads
        self._admit()
        for batch in list(self.batches):
            if batch.rows:
                self._step(batch)
        self.batches = [batch for batch in self.batches if batch.rows]

    def _admit(self) -> None:
        """Admit waiting sequences up to `max_batch`, then run this round's one prefill pass: the
        running batches decode between passes, so a long prompt never stalls them for longer than
        `prefill_chunk` positions take."""
        with self._wake:
            room = self.max_batch - self.running - self.prefilling
            self._ready += [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        for seq in list(self._ready):
            prefix = self._stored_prefix(seq)
            if prefix is not None or len(seq.prompt_ids) > self.prefill_chunk:
                self._ready.remove(seq)
                self._queue_chunked(seq, prefix)
        chunk_turn = bool(self._chunked) and (not self._ready or self._chunk_turn)
        self._chunk_turn = not self._chunk_turn
        if chunk_turn:
            self._advance_chunked()
        elif self._ready:
            self._prefill_ready()

    def _stored_prefix(self, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The K/V of the longest stored prefix of the sequence's prompt, when it may use one."""
        if self.prefix_store is None or seq.echo_logprobs or not _reuses_kv(seq.loop):
            return None
        kept, entry = self.prefix_store.longest(seq.loop.steps, seq.prompt_ids)
        if entry is None:
            return None
        seq.cached_tokens = kept
        return entry.keys[:, :, :kept], entry.values[:, :, :kept]

    def _queue_chunked(self, seq: Sequence, prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """A long prompt, or one that starts with stored K/V, waits for chunked prefill; the
        choices of one prompt share it."""
        for prefill, seqs in self._chunked:
            if (not seq.echo_logprobs and not prefill.every_position and prefill.done == prefill.kept
                    and prefill.prompt == seq.prompt_ids and seqs[0].loop == seq.loop):
                seqs.append(seq)
                return
        try:
            prefill = ChunkedPrefill(self.model, seq.loop.steps, loop_policy(self.model, seq.loop), seq.prompt_ids,
                                     seq.echo_logprobs, prefix)
        except Exception as exc:  # e.g. no memory for its cache
            log.exception("prefill failed")
            self._emit(seq, Event("error", message=f"prefill failed: {exc}"))
            return
        self._chunked.append((prefill, [seq]))

    def _advance_chunked(self) -> None:
        """The next chunk of the oldest long prompt (all of it when nothing else is decoding)."""
        prefill, seqs = self._chunked[0]
        tokens = self.prefill_chunk if self.running else len(prefill.prompt)
        try:
            finished = prefill.advance(tokens)
        except Exception as exc:
            log.exception("prefill failed")
            self._chunked.pop(0)
            for seq in seqs:
                self._emit(seq, Event("error", message=f"prefill failed: {exc}"))
            return
        if finished is not None:
            self._chunked.pop(0)
            self.prefills_total += 1
            self.cached_prompt_tokens_total += prefill.kept  # once per prompt pass, as prefills_total
            for seq in seqs:
                self._start_safely(seq, finished, 0)

    def _prefill_ready(self) -> None:
        """One left-padded pass over the short prompts of the oldest ready sequence's loop
        configuration (by length, within `prefill_chunk` padded positions and PREFILL_ROWS)."""
        head = self._ready[0]
        if head.echo_logprobs:  # reads every prompt position: one prompt per pass
            group = [head]
        else:
            same = [seq for seq in self._ready if seq.loop == head.loop and not seq.echo_logprobs]
            group = next(chunk for chunk in _prefill_chunks(same, self.prefill_chunk) if head in chunk)
        for seq in group:
            self._ready.remove(seq)
        self._prefill_and_join(group)

    def _prefill_and_join(self, seqs: list[Sequence]) -> None:
        prompts = list(dict.fromkeys(tuple(seq.prompt_ids) for seq in seqs))  # the n choices of a prompt share it
        loop, echo = seqs[0].loop, seqs[0].echo_logprobs
        try:
            prefill = prefill_prompts(self.model, loop.steps, loop_policy(self.model, loop), [list(p) for p in prompts],
                                      echo)
        except Exception as exc:  # a bad request must not take the engine down
            log.exception("prefill failed")
            for seq in seqs:
                self._emit(seq, Event("error", message=f"prefill failed: {exc}"))
            return
        self.prefills_total += len(prompts)
        for seq in seqs:
            self._start_safely(seq, prefill, prompts.index(tuple(seq.prompt_ids)))

    def _start_safely(self, seq: Sequence, prefill: Prefill, row: int) -> None:
        try:
            self._start(seq, prefill, row)
        except Exception as exc:
            log.exception("joining a batch failed")
            self._emit(seq, Event("error", message=f"prefill failed: {exc}"))

    def _start(self, seq: Sequence, prefill: Prefill, row: int) -> None:
        """A prefilled sequence's first token, then its place in a batch (unless that token ended it)."""
        self.prompt_tokens_total += len(seq.prompt_ids)
        if prefill.every is not None:
            self._emit(seq, Event("prompt", prompt_logprobs=self._prompt_logprobs(seq, prefill.every)))
        if seq.max_tokens == 0:  # only the prompt's log-probabilities were asked for
            self._emit(seq, Event("done", finish_reason="length"))
            return
        logits = prefill.logits[row : row + 1]
        token = self._sample([seq], logits)[0]
        if token is not None and self._deliver(seq, token, int(prefill.exit_steps[row]) + 1, logits[0]):
            self._batch_for(seq).join(seq, prefill, row)
            self.peak_running = max(self.peak_running, self.running)

    def _batch_for(self, seq: Sequence) -> Batch:
        """A running batch of the sequence's loop configuration with room for it, else a new one."""
        batch = next((b for b in self.batches if b.loop == seq.loop and b.fits(len(seq.prompt_ids), seq.remaining)),
                     None)
        if batch is None:
            batch = Batch(self.model, seq.loop, self.max_context)
            self.batches.append(batch)
        return batch

    def _step(self, batch: Batch) -> None:
        try:
            logits, exit_steps = batch.decode()
            tokens = self._sample(batch.rows, logits)
        except Exception as exc:
            log.exception("decode step failed")
            for seq in list(batch.rows):
                self._emit(seq, Event("error", message=f"decode failed: {exc}"))
            batch.rows.clear()
            return
        self.decode_steps_total += 1
        for seq, token, exit_step, row_logits in zip(list(batch.rows), tokens, exit_steps.tolist(), logits):
            if token is None or not self._deliver(seq, token, exit_step + 1, row_logits):
                self._leave(batch, seq)

    def _leave(self, batch: Batch, seq: Sequence) -> None:
        """A sequence leaves its batch; its K/V (prompt, then every token fed back) go to the prefix store."""
        if self.prefix_store is not None and _reuses_kv(batch.loop):
            row = batch.rows.index(seq)
            ids = (seq.prompt_ids + seq.tokens)[: batch.length - seq.start]
            columns = slice(seq.start, batch.length)
            try:
                self.prefix_store.put(batch.loop.steps, ids, batch.keys[:, row, :, columns],
                                      batch.values[:, row, :, columns])
            except Exception:  # the store only saves later work (e.g. no memory for its copy): go on without
                log.exception("could not store a finished sequence's K/V")
        batch.leave(seq)

    def _deliver(self, seq: Sequence, token: int, loops: int, logits: torch.Tensor) -> bool:
        """Hand one token, read from `logits` [V], over; False when the sequence is finished (or cancelled)."""
        if seq.cancelled:
            return False
        seq.generated += 1
        seq.tokens.append(token)
        seq.last_token = token
        self.tokens_total += 1
        self.loops_total += loops
        logprob = None if seq.logprobs is None else _token_logprobs([token], logits.unsqueeze(0), seq.logprobs)[0]
        self._emit(seq, Event("token", token=token, loops=loops, logprob=logprob))
        if token in seq.eos_ids or seq.generated >= seq.max_tokens:
            self._emit(seq, Event("done", finish_reason="stop" if token in seq.eos_ids else "length"))
            return False
        return True

    def _prompt_logprobs(self, seq: Sequence, every: torch.Tensor) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (position j's logits
        predict token j + 1); the first token has none."""
        first = TokenLogprob(seq.prompt_ids[0], None, [])
        return [first, *_token_logprobs(seq.prompt_ids[1:], every[:-1], seq.logprobs or 0)]

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> list[int | None]:
        """Each row's next token; None for a row whose own sampling failed (it got an error
        event), so one request's settings can never fail the others in its batch."""
        # One call for the plain greedy rows; -1 marks a row whose logits are NaN or infinite.
        greedy = torch.where(usable_rows(logits), logits.argmax(dim=-1), -1).tolist()
        chosen: list[int | None] = []
        for i, seq in enumerate(rows):
            if greedy[i] < 0:  # broken weights, or a numeric blow-up in this row: fail it alone
                log.warning("sampling failed: %s", BAD_LOGITS)
                self._emit(seq, Event("error", message=f"sampling failed: {BAD_LOGITS}"))
                chosen.append(None)
                continue
            if seq.sampling.greedy and not seq.sampling.adjusts_logits:
                chosen.append(greedy[i])
                continue
            try:
                chosen.append(int(seq.chooser(logits[i : i + 1])[0]))
            except Exception as exc:
                log.exception("sampling failed")
                self._emit(seq, Event("error", message=f"sampling failed: {exc}"))
                chosen.append(None)
        return chosen

    def _retire(self, seq: Sequence) -> None:
        if seq in self._ready:
            self._ready.remove(seq)
        for prefill, seqs in list(self._chunked):
            if seq in seqs:
                seqs.remove(seq)
                if not seqs:  # nobody waits for this prompt any more
                    self._chunked.remove((prefill, seqs))
        for batch in self.batches:
            if seq in batch.rows:
                self._leave(batch, seq)

    def _emit(self, seq: Sequence, event: Event) -> None:
        try:
            seq.on_event(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop the sequence
            seq.cancelled = True

    def _fail_all(self, message: str) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting:
            self._emit(seq, Event("error", message=message))
        self._fail_in_flight(message)

    def _fail_in_flight(self, message: str) -> None:
        """End every admitted sequence (prefilling or decoding) with an error; the queue waits on."""
        pending = self._ready + [seq for _, seqs in self._chunked for seq in seqs]
        for seq in pending + [seq for batch in self.batches for seq in batch.rows]:
            self._emit(seq, Event("error", message=message))
        self.batches, self._ready, self._chunked = [], [], []


def _reuses_kv(loop: LoopConfig) -> bool:
    """Whether a row's K/V are what a prompt pass computes: every loop, one K/V per (step, layer)."""
    return loop.kv_mode == "full" and not loop.skip_compute


# The most prompts one prefill pass takes (the padded positions are bounded by `prefill_chunk`).
PREFILL_ROWS = 16


def _prefill_chunks(seqs: list[Sequence], budget: int) -> list[list[Sequence]]:
    """Sequences (one loop configuration) in groups to prefill together: by prompt length, so a
    group pads little, each within `budget` padded positions and PREFILL_ROWS prompts (a longer
    prompt goes alone)."""
    chunks: list[list[Sequence]] = []
    prompts: set[tuple] = set()
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        key = tuple(seq.prompt_ids)
        rows = len(prompts | {key})
        if chunks and (key in prompts or (rows <= PREFILL_ROWS and rows * len(key) <= budget)):
            chunks[-1].append(seq)  # a prompt already in the group costs nothing more
            prompts.add(key)
            continue
        chunks.append([seq])
        prompts = {key}
    return chunks


def _token_logprobs(tokens: list[int], logits: torch.Tensor, alternatives: int) -> list[TokenLogprob]:
    """`TokenLogprob`s of `tokens` [N] under `logits` [N, V] (log-softmax in fp32), each with its
    `alternatives` likeliest tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    top = logprobs.topk(alternatives, dim=-1)
    pairs = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    return [TokenLogprob(token, lp, alts) for token, lp, alts in zip(tokens, chosen, pairs)]
