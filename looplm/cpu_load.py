"""How many CPU threads to use when the user did not say: fewer when other processes hold cores.

torch's CPU ops (and looplm's kernels) split each op over the intra-op threads and wait for all of
them at its end. A decode step runs thousands of short ops, so when another process keeps a core
busy, the thread the scheduler sets aside keeps the others waiting at every op: on a 2-core
machine with one busy process, decode with 2 threads ran 2.3-3.2x slower than with 1, for models
from 5.5M to 135M parameters (`benchmarks/bench_threads.py`, docs/benchmarks.md). So the command
line samples the machine's load (per-CPU times, through psutil) for a moment before it starts
and leaves the busy cores alone. Where that cannot be measured, or nothing else is busy, torch's
own default stands.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

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
    busy = 0.0
    for cpu in (cpus if cpus is not None else after.keys()):
        if cpu in before and cpu in after and after[cpu][1] > before[cpu][1]:
            busy += (after[cpu][0] - before[cpu][0]) / (after[cpu][1] - before[cpu][1])
    return max(0.0, busy - max(0.0, own_after - own_before) / seconds)


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
