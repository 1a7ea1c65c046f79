"""How many CPU threads to use when the user did not say: fewer when other processes hold cores.

torch's CPU ops (and looplm's kernels) split each op over the intra-op threads and wait for all of
them at its end. A decode step runs thousands of short ops, so when another process keeps a core
busy, the thread the scheduler sets aside keeps the others waiting at every op: on a 2-core
machine with one busy process, decode with 2 threads ran 2.3-3.2x slower than with 1, for models
from 5.5M to 135M parameters (`benchmarks/bench_threads.py`, docs/benchmarks.md). So the command
line samples the machine's load (per-CPU times, through psutil) for a moment before it starts
and leaves the busy cores alone. Where that cannot be measured, or nothing else is busy, torch's
own default stands.

A long run (a server, an evaluation, training) keeps checking: `use_free_cores()` (what the
command line calls without --threads; Python code may call it too) installs a `ThreadGovernor`,
and the serving engine, the trainer and log-likelihood scoring call `adjust_threads()` between steps,
which every `interval` seconds measures the load of the window just past and moves the thread
count to the cores then free (back to the default when the other work ends).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

log = logging.getLogger("looplm")

SAMPLE_SECONDS = 0.1
# Busy cores (summed over processes) below this count as idle: short bursts of daemons.
IDLE_BELOW = 0.5


@dataclass(frozen=True)
class ThreadChoice:
    threads: int | None  # None: leave torch's default
    busy_cores: float | None  # other processes' CPU use while sampled, in cores; None: not measured
    default: int  # torch's default thread count


def cpu_times() -> dict[int, tuple[float, float]] | None:
    """Per CPU: (busy, total) seconds so far; None where the platform cannot say."""
    try:
        per_cpu = psutil.cpu_times(percpu=True)
    except (OSError, NotImplementedError):
        return None
    times = {}
    for index, cpu in enumerate(per_cpu):
        fields = cpu._asdict()
        # guest time is already counted in user time; idle and iowait are the idle kinds
        total = sum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)
        times[index] = (total - fields["idle"] - fields.get("iowait", 0.0), total)
    return times or None


def allowed_cpus() -> set[int] | None:
    """The CPUs this process may run on (None where the platform cannot say)."""
    try:
        return set(psutil.Process().cpu_affinity())
    except (AttributeError, OSError, psutil.Error):
        return None


def other_cores_between(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]],
                        own_seconds: float, window: float, cpus: set[int] | None) -> float:
    """Cores other processes kept busy between two `cpu_times` readings `window` seconds apart, over
    `cpus` (None: all): every process's busy time, less the `own_seconds` of CPU this one used."""
    busy = 0.0
    for cpu in (cpus if cpus is not None else after.keys()):
        if cpu in before and cpu in after and after[cpu][1] > before[cpu][1]:
            busy += (after[cpu][0] - before[cpu][0]) / (after[cpu][1] - before[cpu][1])
    return max(0.0, busy - max(0.0, own_seconds) / window)


def other_busy_cores(seconds: float = SAMPLE_SECONDS,
                     read: Callable[[], dict[int, tuple[float, float]] | None] = cpu_times,
                     sleep: Callable[[float], None] = time.sleep, cpus: set[int] | None = None) -> float | None:
    """Cores among the ones this process may use that other processes kept busy over `seconds`
    (this process sleeps meanwhile, and its own CPU time is taken off)."""
    cpus = cpus if cpus is not None else allowed_cpus()
    before, own_before = read(), _own_cpu_seconds()
    sleep(seconds)
    after, own_after = read(), _own_cpu_seconds()
    if before is None or after is None:
        return None
    return other_cores_between(before, after, own_after - own_before, seconds, cpus)


def _own_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def choose_threads(default: int, busy: float | None, cpus: int) -> ThreadChoice:
    """torch's `default` threads, unless other processes hold so many of the `cpus` this process
    may use that fewer than `default` are free: then the free ones (at least one)."""
    if busy is None or busy < IDLE_BELOW:
        return ThreadChoice(None, busy, default)
    free = max(1, cpus - round(busy))
    return ThreadChoice(free if free < default else None, busy, default)


class ThreadGovernor:
    """Every `interval` seconds (checked when called), the cores other processes held over the
    window just past; sets the thread count to the free ones, or back to `default`."""

    def __init__(self, default: int, cpus: set[int] | None, current: int | None = None, interval: float = 5.0,
                 read: Callable[[], dict[int, tuple[float, float]] | None] = cpu_times,
                 clock: Callable[[], float] = time.monotonic,
                 own_seconds: Callable[[], float] = _own_cpu_seconds,
                 set_threads: Callable[[int], None] | None = None) -> None:
        self.default, self.cpus, self.interval = default, cpus, interval
        self.threads = current or default
        self._read, self._clock, self._own = read, clock, own_seconds
        self._set = set_threads or _set_torch_threads
        self._start()

    def _start(self) -> None:
        self._since, self._before, self._own_before = self._clock(), self._read(), self._own()

    def __call__(self) -> None:
        now = self._clock()
        if now - self._since < self.interval:
            return
        after, own = self._read(), self._own()
        window, before, own_before = now - self._since, self._before, self._own_before
        self._start()
        if before is None or after is None:
            return
        busy = other_cores_between(before, after, own - own_before, window, self.cpus)
        count = len(self.cpus) if self.cpus else len(after)
        threads = choose_threads(self.default, busy, count).threads or self.default
        if threads != self.threads:
            log.info("other processes kept %.1f cores busy: using %d of %d threads (was %d)", busy, threads,
                     self.default, self.threads)
            self._set(threads)
            self.threads = threads


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# The process's governor, installed by `use_free_cores` (the command line's default without --threads).
_governor: ThreadGovernor | None = None


def install_governor(governor: ThreadGovernor | None) -> None:
    global _governor
    _governor = governor


def adjust_threads() -> None:
    """Called between steps of long work; does nothing unless a governor is installed."""
    if _governor is not None:
        _governor()


def free_cores_now(cpus: set[int] | None = None) -> ThreadChoice | None:
    """The threads to use given the load now (measured for `SAMPLE_SECONDS`); None where the user
    set OMP_NUM_THREADS or torch runs one thread anyway (nothing to choose)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() == 1:
        return None
    return choose_threads(torch.get_num_threads(), other_busy_cores(cpus=cpus), len(cpus or ()) or os.cpu_count() or 1)


def use_free_cores() -> ThreadChoice | None:
    """Set torch's threads to the cores other processes leave free now, and install a governor so
    that long runs follow the load from there (`adjust_threads`). None, changing nothing, where
    there is nothing to choose (`free_cores_now`)."""
    import torch

    cpus = allowed_cpus()
    choice = free_cores_now(cpus)
    if choice is None:
        return None
    install_governor(ThreadGovernor(choice.default, cpus, current=choice.threads))
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    return choice
