"""The default thread count leaves alone the cores other processes keep busy (looplm.cpu_load)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from looplm import cpu_load
from looplm.cli import common
from looplm.cpu_load import choose_threads, other_busy_cores


def fake_stat(*snapshots: dict[int, tuple[float, float]]):  # noqa: ANN201
    readings = iter(snapshots)
    return lambda: next(readings)


def test_busy_cores_are_counted_per_allowed_cpu() -> None:
    before = {0: (100.0, 1000.0), 1: (100.0, 1000.0), 2: (0.0, 500.0)}
    after = {0: (102.0, 1010.0), 1: (110.0, 1010.0), 2: (10.0, 510.0)}  # cpu 0 20% busy, cpus 1 and 2 fully
    busy = other_busy_cores(0.1, read=fake_stat(before, after), sleep=lambda s: None, cpus={0, 1})
    assert busy == pytest.approx(1.2, abs=0.05)  # cpu 2 is not ours to use
    everything = other_busy_cores(0.1, read=fake_stat(before, after), sleep=lambda s: None, cpus={0, 1, 2})
    assert everything == pytest.approx(2.2, abs=0.05)


def test_busy_cores_are_unknown_where_cpu_times_are() -> None:
    assert other_busy_cores(0.1, read=lambda: None, sleep=lambda s: None, cpus={0}) is None


@pytest.mark.parametrize(("default", "busy", "cpus", "threads"), [
    (2, 1.0, 2, 1),     # one of two cores busy: one thread
    (2, 1.9, 2, 1),     # never fewer than one
    (2, 0.3, 2, None),  # a daemon's burst: torch's default
    (2, None, 2, None),  # not measured: torch's default
    (8, 4.0, 16, None),  # 12 free logical CPUs for torch's 8 threads
    (8, 12.0, 16, 4),
])
def test_threads_leave_the_busy_cores(default: int, busy: float | None, cpus: int, threads: int | None) -> None:
    assert choose_threads(default, busy, cpus).threads == threads


def test_a_spinning_process_is_seen_as_one_busy_core() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = other_busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6


@pytest.fixture
def restore_threads():  # noqa: ANN201
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_command_line_uses_the_free_cores_unless_told(monkeypatch: pytest.MonkeyPatch, restore_threads) -> None:  # noqa: ANN001
    monkeypatch.setattr(cpu_load, "_governor", None)  # the one set_threads installs goes with the test
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_load, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(cpu_load, "other_busy_cores", lambda cpus=None: 1.0)
    torch.set_num_threads(2)
    common.set_threads(None)
    assert torch.get_num_threads() == 1
    assert cpu_load._governor is not None and cpu_load._governor.threads == 1  # a long run keeps checking
    torch.set_num_threads(2)
    common.set_threads(2)  # --threads wins
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # so does the user's OpenMP setting
    common.set_threads(None)
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cpu_load, "other_busy_cores", lambda cpus=None: 0.0)  # an idle machine: torch's default
    common.set_threads(None)
    assert torch.get_num_threads() == 2


class FakeMachine:
    """Per-CPU times, this process's CPU seconds and a clock that tests move by hand."""

    def __init__(self) -> None:
        self.now, self.own, self.cpus = 0.0, 0.0, {0: [0.0, 0.0], 1: [0.0, 0.0]}

    def run(self, seconds: float, busy: dict[int, float], own_cores: float = 0.0) -> None:
        """`seconds` pass with CPU i busy `busy[i]` of the time (this process using `own_cores` of it)."""
        self.now += seconds
        self.own += own_cores * seconds
        for cpu, times in self.cpus.items():
            times[0] += busy.get(cpu, 0.0) * seconds
            times[1] += seconds

    def read(self) -> dict[int, tuple[float, float]]:
        return {cpu: (busy, total) for cpu, (busy, total) in self.cpus.items()}


def test_the_governor_follows_the_load_of_each_window() -> None:
    machine, calls = FakeMachine(), []
    governor = cpu_load.ThreadGovernor(2, {0, 1}, interval=5.0, read=machine.read, clock=lambda: machine.now,
                                       own_seconds=lambda: machine.own, set_threads=calls.append)
    machine.run(2.0, {1: 1.0})
    governor()  # within the interval: nothing measured yet
    assert calls == []
    machine.run(3.0, {1: 1.0})
    governor()  # another process held CPU 1 over the window: one thread
    assert calls == [1] and governor.threads == 1
    machine.run(5.0, {0: 1.0, 1: 1.0}, own_cores=1.0)  # it still holds one core; this process the other
    governor()
    assert calls == [1]
    machine.run(5.0, {0: 1.0, 1: 1.0}, own_cores=2.0)  # it left: both busy cores are this process's own
    governor()
    assert calls == [1, 2] and governor.threads == 2


def test_adjust_threads_runs_the_installed_governor_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_load, "_governor", None)
    cpu_load.adjust_threads()  # nothing installed: nothing happens
    calls = []
    cpu_load.install_governor(lambda: calls.append(1))  # type: ignore[arg-type]
    cpu_load.adjust_threads()
    assert calls == [1]


def test_the_serving_engine_checks_the_threads_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    import looplm
    from looplm.server.jobs import Job, run_jobs

    calls = []
    monkeypatch.setattr(cpu_load, "_governor", lambda: calls.append(1))
    results = list(run_jobs(looplm.load(), [Job([5, 6, 7], 6)], max_batch=1))
    tokens = len(results[0].tokens)  # up to 6 (an eos may end it sooner)
    assert len(calls) >= max(1, tokens - 1)  # once a round; the first token comes with the prefill


def test_loglik_scoring_checks_the_threads_between_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    import looplm
    from looplm.eval.loglik import Config, score_choices, score_requests

    calls = []
    monkeypatch.setattr(cpu_load, "_governor", lambda: calls.append(1))
    model, configs = looplm.load(dtype="float32"), [Config(2)]
    score_requests(model, [([5, 6], [7]), ([8], [9, 10]), ([11], [12])], configs, {}, batch_size=2)
    assert len(calls) == 2  # one a batch
    score_choices(model, [5, 6], [[7], [8]], configs, {})
    assert len(calls) == 3


def test_inspect_reports_the_threads_a_command_would_use(monkeypatch: pytest.MonkeyPatch, restore_threads) -> None:  # noqa: ANN001
    import looplm
    from looplm.cli.inspect import runtime

    model = looplm.load()
    monkeypatch.setattr(cpu_load, "_governor", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_load, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(cpu_load, "other_busy_cores", lambda cpus=None: 1.0)
    torch.set_num_threads(2)
    report = runtime(model)
    assert report["threads"] == 1 and report["default_threads"] == 2 and report["other_busy_cores"] == 1.0
    assert report["kernels"] == model.kernels
    assert torch.get_num_threads() == 2 and cpu_load._governor is None  # inspecting changes nothing
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's setting: nothing measured, nothing chosen
    assert runtime(model)["threads"] == 2 and runtime(model)["other_busy_cores"] is None
