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
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_load, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(cpu_load, "other_busy_cores", lambda cpus=None: 1.0)
    torch.set_num_threads(2)
    common.set_threads(None)
    assert torch.get_num_threads() == 1
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
