"""What does each GPU-failure recovery cost? Measured on fake devices with injected faults (no GPU needed).

Each scenario starts its own celery-gpu worker (``benchmarks._recovery_app``, ``CELERY_GPU_FAULTS`` set as
named) and compares against a baseline in the same run:

* ``oom``: 2,000 items of a batched no-op (batch 64) on one fake device, with no fault and with ``oom_above=8``
  (every batch above 8 items runs out of memory until the pool caps the task at 8): items/s of each, ratio.
* ``crash``: a 1 s task whose process is SIGKILLed 0.3 s in; the time from the kill to its result (it runs
  again from the start, elsewhere) minus the 1 s it needs: the recovery overhead. With two fake devices (it
  moves to the other process) and with one (it waits for the respawn).
* ``respawn``: SIGKILL of an idle device process until its replacement takes work (a task runs between two
  kills: deaths in a row with no task done back off, 0.5 s, 1 s, 2 s...).
* ``hang``: a call that hangs with signals ignored and the GIL held, under a 1 s hard time limit: time to
  ``TimeLimitExceeded`` minus 1 s.
* ``frozen``: the same hang without a time limit, ``gpu_heartbeat_timeout=2``: time until the task's result
  (run again on the other device) minus the 2 s timeout (it can be below 0: the silence is counted from the
  process's last heartbeat, which came up to 1 s before the hang began).
* ``poison``: one item that kills every process it runs in, in a batch of 16: time until it fails with
  ``TaskCrashedDevice`` (three runs) and until its 15 batch-mates succeed.

Usage::

    python benchmarks/recovery.py [--quick] [--broker redis://127.0.0.1:6379/10] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks.harness import (  # noqa: E402
    Worker,
    celery_worker,
    child_env,
    command_line,
    emit,
    machine,
    open_broker,
)

APP = "benchmarks._recovery_app"


def _client(url: str, queue: str) -> Any:
    from celery import Celery

    from celery_gpu import GPU

    app = Celery(f"recovery-client-{queue}", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_default_queue=queue, result_expires=600)
    gpu = GPU(app)

    def echo(items: list[Any]) -> list[Any]:
        raise AssertionError("runs in the worker")

    def nap(seconds: float) -> int:
        raise AssertionError("runs in the worker")

    app.echo = gpu.task(name=f"{APP}.echo", batch=64)(echo)
    app.nap = gpu.task(name=f"{APP}.nap")(nap)
    return app


@contextlib.contextmanager
def worker(url: str, log_dir: Path, devices: str, faults: str = "", **env: str) -> Iterator[tuple[Worker, Any]]:
    """A ready recovery worker (every slot idle) and a client app on its queue."""
    queue = f"recovery-{uuid.uuid4().hex[:8]}"
    full_env = child_env(url, RECOVERY_QUEUE=queue, CELERY_GPU_DEVICES=devices, CELERY_GPU_FAULTS=faults, **env)
    with celery_worker(APP, queue, ["-Q", queue], full_env, log_dir) as w:
        app = _client(url, queue)
        deadline = time.monotonic() + 120
        while not _slots_ready(app, w):
            w.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready:\n{w.log_tail()}")
            time.sleep(0.2)
        yield w, app


def _pool(app: Any, w: Worker) -> dict[str, Any] | None:
    stats = app.control.inspect([w.hostname], timeout=1.0).stats() or {}
    pool: dict[str, Any] | None = stats.get(w.hostname, {}).get("pool")
    return pool


def _slots(app: Any, w: Worker) -> list[dict[str, Any]]:
    pool = _pool(app, w)
    return [s for d in pool["devices"] for s in d["slots"]] if pool else []


def _slots_ready(app: Any, w: Worker) -> bool:
    slots = _slots(app, w)
    return bool(slots) and all(s["state"] == "idle" for s in slots)


def _wait(predicate: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
    """Seconds until ``predicate()`` holds (raises after ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not met in time")
        time.sleep(step)
    return time.monotonic() - start


def _busy_pid(app: Any, w: Worker) -> int:
    pids: list[int] = []

    def found() -> bool:
        pids[:] = [s["pid"] for s in _slots(app, w) if s["state"] == "busy"]
        return bool(pids)

    _wait(found, 30)
    return pids[0]


def oom(url: str, log_dir: Path, items: int, rounds: int) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"no_fault": [], "oom_above_8": []}
    caps: dict[str, Any] = {}
    for _ in range(rounds):
        for name, faults in (("no_fault", ""), ("oom_above_8", "oom_above=8")):
            with worker(url, log_dir, "fake:1", faults) as (w, app):
                app.echo.submit_many(range(64)).get(timeout=120)  # warm-up (and, with the fault, the splits)
                started = time.perf_counter()
                values = app.echo.submit_many(range(items)).get(timeout=300)
                rates[name].append(items / (time.perf_counter() - started))
                assert values == list(range(items)), "wrong results"
                pool = _pool(app, w) or {}
                caps[name] = pool.get("memory", {}).get("batch_caps")
    best = {k: max(v) for k, v in rates.items()}
    return {"items_per_s": {k: round(v, 1) for k, v in best.items()}, "batch_caps": caps,
            "ratio_oom_vs_no_fault": round(best["oom_above_8"] / best["no_fault"], 3)}


def crash(url: str, log_dir: Path, devices: str, repeats: int) -> dict[str, Any]:
    overheads = []
    with worker(url, log_dir, devices) as (w, app):
        for _ in range(repeats):
            _wait(lambda: _slots_ready(app, w), 60)
            result = app.nap.delay(1.0)
            pid = _busy_pid(app, w)
            time.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            result.get(timeout=60)
            overheads.append(time.monotonic() - killed - 1.0)
    return {"overhead_s_median": round(statistics.median(overheads), 3),
            "overhead_s": [round(x, 3) for x in overheads]}


def respawn(url: str, log_dir: Path, repeats: int) -> dict[str, Any]:
    times = []
    with worker(url, log_dir, "fake:1") as (w, app):
        for _ in range(repeats):
            _wait(lambda: _slots_ready(app, w), 60)
            pid = _slots(app, w)[0]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()

            def replaced(old: int = pid) -> bool:
                return any(s["state"] == "idle" and s["pid"] not in (None, old) for s in _slots(app, w))

            _wait(replaced, 60)
            times.append(time.monotonic() - killed)
            app.nap.delay(0.0).get(timeout=60)  # a task done: the next death is a first one again (no backoff)
    return {"seconds_median": round(statistics.median(times), 3), "seconds": [round(x, 3) for x in times]}


def hang(url: str, log_dir: Path, repeats: int) -> dict[str, Any]:
    overheads = []
    with worker(url, log_dir, "fake:1", "hang_after=0") as (w, app):
        for _ in range(repeats):
            _wait(lambda: _slots_ready(app, w), 60)
            started = time.monotonic()
            result = app.nap.apply_async((0.0,), time_limit=1.0)
            with contextlib.suppress(Exception):
                result.get(timeout=60)
            assert result.state == "FAILURE", result.state
            overheads.append(time.monotonic() - started - 1.0)
    return {"overhead_s_median": round(statistics.median(overheads), 3),
            "overhead_s": [round(x, 3) for x in overheads]}


def frozen(url: str, log_dir: Path, repeats: int) -> dict[str, Any]:
    overheads = []
    with worker(url, log_dir, "fake:2", "hang_after=0,on=0", CELERY_GPU_HEARTBEAT_TIMEOUT="2") as (w, app):
        for _ in range(repeats):
            _wait(lambda: _slots_ready(app, w), 60)
            started = time.monotonic()
            # Both slots get one: the one on fake:0 freezes and runs again on fake:1.
            results = [app.nap.delay(0.0) for _ in range(2)]
            for r in results:
                r.get(timeout=60)
            overheads.append(time.monotonic() - started - 2.0)
    return {"overhead_s_median": round(statistics.median(overheads), 3),
            "overhead_s": [round(x, 3) for x in overheads]}


def poison(url: str, log_dir: Path) -> dict[str, Any]:
    with worker(url, log_dir, "fake:2") as (w, app):
        started = time.monotonic()
        results = app.echo.submit_many([*range(7), "poison", *range(7, 15)])
        mates = [r for i, r in enumerate(results.results) if i != 7]
        for r in mates:
            r.get(timeout=120)
        mates_s = time.monotonic() - started
        with contextlib.suppress(Exception):
            results.results[7].get(timeout=120)
        failed = type(results.results[7].result).__name__
        return {"batch_mates_done_s": round(mates_s, 3), "poison_failed_s": round(time.monotonic() - started, 3),
                "poison_error": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer items and repeats")
    parser.add_argument("--broker", help="Redis URL for broker and results (default: an embedded Redis)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line here")
    args = parser.parse_args(argv)
    items, rounds, repeats = (500, 1, 2) if args.quick else (2000, 2, 5)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        url, broker = open_broker(stack, args.broker)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="recovery-")))
        print(f"broker: {broker}; {os.cpu_count()} CPUs", flush=True)
        results: dict[str, Any] = {}
        scenarios: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
            ("oom", lambda: oom(url, log_dir, items, rounds)),
            ("crash_two_devices", lambda: crash(url, log_dir, "fake:2", repeats)),
            ("crash_one_device", lambda: crash(url, log_dir, "fake:1", repeats)),
            ("respawn", lambda: respawn(url, log_dir, repeats)),
            ("hang", lambda: hang(url, log_dir, repeats)),
            ("frozen", lambda: frozen(url, log_dir, repeats)),
            ("poison", lambda: poison(url, log_dir)),
        )
        for name, run in scenarios:
            results[name] = run()
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    summary = {"benchmark": "recovery", "quick": args.quick, "broker": broker, "machine": machine(),
               "command": command_line("recovery.py", argv),
               "seconds": round(time.monotonic() - started, 1), **results}
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
