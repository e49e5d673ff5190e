"""The CPU thread budget of the CPU device's processes (issue 16 item 7)."""

from __future__ import annotations

import pytest

from celery_gpu.worker import threads
from celery_gpu.worker.threads import THREAD_VARIABLES, budget, thread_env


def test_auto_divides_the_cores_among_the_cpu_devices_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 16)
    assert budget(0, 1, {}) == 16
    assert budget(0, 2, {}) == 8
    assert budget(0, 3, {}) == 5
    assert budget(0, 32, {}) == 1  # never zero


def test_the_setting_wins_then_the_workers_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 16)
    assert budget(3, 2, {"OMP_NUM_THREADS": "6"}) == 3
    assert budget(0, 2, {"OMP_NUM_THREADS": "6"}) == 6
    assert budget(0, 2, {"OMP_NUM_THREADS": "nonsense"}) == 8


def test_every_thread_variable_is_set_before_the_interpreter_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cores", lambda: 8)
    n, env = thread_env(0, 2, {})
    assert n == 4 and env == {name: "4" for name in THREAD_VARIABLES}
    n, env = thread_env(0, 2, {"MKL_NUM_THREADS": "2"})  # the worker's own choice for one library is kept
    assert n == 4 and "MKL_NUM_THREADS" not in env and env["OMP_NUM_THREADS"] == "4"
    n, env = thread_env(3, 2, {"MKL_NUM_THREADS": "2", "OMP_NUM_THREADS": "8"})  # an explicit budget replaces it
    assert n == 3 and env == {name: "3" for name in THREAD_VARIABLES}


def test_cores_is_this_workers_share_of_the_machine() -> None:
    import os

    assert 1 <= threads.cores() <= (os.cpu_count() or 1)
