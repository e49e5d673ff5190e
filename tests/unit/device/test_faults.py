"""Fault injection on fake devices, and the device process's reactions to it (recovery.py, batch splitting)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from celery_gpu.device import faults, recovery
from celery_gpu.device.context import DeviceContext
from celery_gpu.device.split import call_batch as _call_batch
from celery_gpu.errors import DeviceOutOfMemory, FaultSpecError
from celery_gpu.tasks.batched import BatchOptions

ctx = DeviceContext()


def call_batch(task: Any, items: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    return _call_batch(ctx, task, items, kwargs)


class Exited(BaseException):
    """Stands for the device process's exit after a sticky error."""


@pytest.fixture(autouse=True)
def clean() -> Iterator[list[tuple[str, str]]]:
    reported: list[tuple[str, str]] = []

    def on_sticky(error: str, text: str) -> None:
        reported.append((error, text))
        raise Exited(error)

    ctx.on_sticky = on_sticky
    ctx.take_oom_stats()
    yield reported
    ctx.on_sticky = None
    ctx.faults = None
    ctx.take_oom_stats()


def _activate(spec: str, kind: str = "fake", index: int = 0) -> faults.Faults | None:
    ctx.faults = faults.activate(kind, index, {faults.FAULTS_ENV: spec})
    return ctx.faults


def test_parse() -> None:
    f = faults.Faults.parse("oom_above=8, sticky_after=5,hang_after=2,crash_after=3,crash=segv,leak=1MiB,"
                            "peak=2KiB,fail_start,on=0+2")
    assert (f.oom_above, f.sticky_after, f.hang_after, f.crash_after, f.crash) == (8, 5, 2, 3, "segv")
    assert (f.leak, f.peak, f.fail_start, f.on) == (1024**2, 2048, True, {0, 2})
    assert faults.Faults.parse("on=fake:1").on == {1}
    for bad in ("oom_above=x", "crash=bomb", "explode=1", "leak=lots"):
        with pytest.raises(FaultSpecError, match="CELERY_GPU_FAULTS"):
            faults.Faults.parse(bad)


def test_faults_fire_only_on_the_fake_devices_named() -> None:
    assert _activate("oom_above=1", kind="cuda") is None, "never on a real GPU"
    assert _activate("oom_above=1", kind="cpu") is None
    assert _activate("oom_above=1,on=1", index=0) is None
    assert _activate("") is None
    assert _activate("oom_above=1,on=1", index=1) is not None
    ctx.on_call(1)
    with pytest.raises(faults.OutOfMemoryError, match="Tried to allocate"):
        ctx.on_call(2)


def test_sticky_after_k_calls_stays_sticky() -> None:
    _activate("sticky_after=2")
    ctx.on_call(1)
    ctx.on_call(1)
    for _ in range(3):
        with pytest.raises(faults.FakeCudaError, match="illegal memory access"):
            ctx.on_call(1)


def test_leak_and_peak_are_counted() -> None:
    f = _activate("leak=1MiB,peak=1KiB")
    assert f is not None
    ctx.on_call(3)
    ctx.on_call(5)
    assert f.leaked == 2 * 1024**2
    assert f.last_peak == 5 * 1024


@pytest.mark.parametrize(("how", "expected"), [("kill", -signal.SIGKILL), ("exit", 1), ("segv", -signal.SIGSEGV)])
def test_crash(how: str, expected: int) -> None:
    code = ("from celery_gpu.device import faults; f = faults.activate('fake', 0); f.on_call(1); f.on_call(1); "
            "print('survived')")
    env = dict(os.environ, CELERY_GPU_FAULTS=f"crash_after=1,crash={how}")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == expected
    assert b"survived" not in proc.stdout


def test_hang_masks_signals_and_holds_the_gil() -> None:
    code = ("import threading, time, sys\n"
            "from celery_gpu.device import faults\n"
            "f = faults.activate('fake', 0)\n"
            "def tick():\n"
            "    while True:\n"
            "        print('tick', flush=True); time.sleep(0.05)\n"
            "threading.Thread(target=tick, daemon=True).start()\n"
            "time.sleep(0.3); print('hanging', flush=True); f.on_call(1)\n")
    env = dict(os.environ, CELERY_GPU_FAULTS="hang_after=0")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != b"hanging":
            pass
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None, "a masked hang survives SIGTERM and SIGINT"
        os.set_blocking(proc.stdout.fileno(), False)
        later = proc.stdout.read() or b""
        assert later.count(b"tick") <= 1, "no other thread runs while the GIL is held"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _plain(run: Any) -> Any:
    task = SimpleNamespace(name="proj.plain", run=run)
    recovery.protect(ctx, task)
    return task


def test_plain_task_retries_once_after_oom() -> None:
    calls = []

    def run(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            raise faults.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 bytes")
        return x * 2

    assert _plain(run).run(21) == 42
    assert calls == [21, 21]


def test_plain_task_that_never_fits_fails_by_name_with_the_memory_it_wanted() -> None:
    _activate("oom_above=0,peak=3MiB")
    task = _plain(lambda x: x)
    with pytest.raises(DeviceOutOfMemory, match=r"proj\.plain does not fit .*3\.00 MiB"):
        task.run(1)


def test_plain_task_ordinary_errors_pass_through() -> None:
    def run() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        _plain(run).run()


def test_plain_task_sticky_error_ends_the_process(clean: list[tuple[str, str]]) -> None:
    def run() -> None:
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(Exited):
        _plain(run).run()
    assert "device-side assert" in clean[0][0]
    assert "Traceback" in clean[0][1]


def _batched(fn: Any) -> Any:
    return SimpleNamespace(name="proj.batched", gpu_batch=BatchOptions(64, 0.005, fn, False))


def test_oom_splits_the_batch_and_remembers_what_fit() -> None:
    _activate("oom_above=8")
    sizes: list[int] = []

    def fn(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [x + 1 for x in items]

    assert call_batch(_batched(fn), list(range(32)), {}) == [x + 1 for x in range(32)]
    assert sizes == [8, 8, 8, 8]
    splits, fit = ctx.take_oom_stats()
    assert splits == 3 and fit == 8  # 32 -> 16 + 16 -> four 8s
    assert ctx.take_oom_stats() == (0, 0), "read once"


def test_an_item_that_does_not_fit_alone_fails_and_the_rest_succeed() -> None:
    def fn(items: list[int]) -> list[int]:
        if 99 in items:
            raise faults.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return items

    out = call_batch(_batched(fn), [1, 2, 99, 4], {})
    assert out[:2] == [1, 2] and out[3] == 4
    assert isinstance(out[2], DeviceOutOfMemory) and "2.00 GiB" in str(out[2])


def test_sticky_error_in_a_batch_is_not_split(clean: list[tuple[str, str]]) -> None:
    calls = []

    def fn(items: list[int]) -> list[int]:
        calls.append(len(items))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(Exited):
        call_batch(_batched(fn), list(range(16)), {})
    assert calls == [16], "no call after the error"


def test_outside_a_device_process_a_sticky_error_is_an_ordinary_failure() -> None:
    ctx.on_sticky = None

    def fn(items: list[int]) -> list[int]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    out = call_batch(_batched(fn), [1], {})
    assert isinstance(out[0], RuntimeError)
