"""The benchmark process as a Celery client of a running worker: readiness, sending items and collecting their
results, round trips, checking every output, the worker's batching counters, and a worker started and warmed up
in one step."""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.harness.processes import Worker, celery_worker, print_loud_lines

READY_TIMEOUT = 180.0  # seconds for a worker to start and load the model in every process
RESULT_TIMEOUT = 300.0  # seconds to wait for the results of a throughput batch
REL_TOLERANCE = 1e-4  # the paths must compute the same outputs
# ``interval`` of ``ResultSet.get`` for the ``.delay`` paths. On a Redis backend Celery's ``ResultSet.get`` first
# MGETs every result and, if one is not ready, sleeps ``interval`` once before it listens for the rest (0.5 s by
# default). ``submit_many`` returns celery-gpu's ``ItemResults``, which does not sleep there: used as is.
COLLECT_INTERVAL = 0.001


def wait_result(result: Any, worker: Worker, deadline: float) -> Any:
    """``result.get()``, checking that the worker still runs and the deadline has not passed."""
    from celery.exceptions import TimeoutError as ResultTimeout

    while True:
        try:
            return result.get(timeout=1.0)
        except ResultTimeout:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result from {worker.hostname} in time:\n{worker.log_tail()}") from None


def wait_ready(app_module: ModuleType, worker: Worker, processes: int) -> None:
    """Block until every one of the worker's ``processes`` processes has run a task (``app_module.whoami``)."""
    deadline = time.monotonic() + READY_TIMEOUT
    seen: set[int] = set()
    while len(seen) < processes:
        batch = [app_module.whoami.delay(0.2) for _ in range(2 * processes)]
        seen |= {int(wait_result(r, worker, deadline)) for r in batch}
    worker.pids |= seen


def collect(result_set: Any, worker: Worker) -> list[Any]:
    """Every result of a ``ResultSet``, in order; fails if the worker dies or ``RESULT_TIMEOUT`` passes."""
    deadline = time.monotonic() + RESULT_TIMEOUT

    def on_interval() -> None:
        worker.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no results from {worker.hostname} in time:\n{worker.log_tail()}")

    from celery_gpu.tasks.submit import ItemResults

    extra = {} if isinstance(result_set, ItemResults) else {"interval": COLLECT_INTERVAL}
    return list(result_set.get(timeout=RESULT_TIMEOUT, on_interval=on_interval, **extra))


def send(task: Any, items: list[list[float]], bulk: bool) -> Any:
    """Send one task per item: ``submit_many`` (bulk) or one ``.delay`` each; a ``ResultSet``."""
    from celery.result import ResultSet

    if bulk:
        return task.submit_many(items)
    return ResultSet([task.delay(x) for x in items], app=task.app)


def round_trips(task: Any, inputs: list[list[float]], count: int, bulk: bool = False) -> list[float]:
    """Seconds of each of ``count`` sequential single-item round trips (``.delay(x).get()``, or
    ``submit_many([x]).get()`` for the bulk path)."""
    times = []
    for i in range(count):
        x = inputs[i % len(inputs)]
        started = time.perf_counter()
        if bulk:
            task.submit_many([x]).get(timeout=60)  # ItemResults: the user's plain call
        else:
            task.delay(x).get(timeout=60)
        times.append(time.perf_counter() - started)
    return times


def check_outputs(name: str, values: Sequence[Any], expected: Sequence[float]) -> None:
    """Item ``i`` was ``expected[i % len(expected)]``: fail loudly on any difference beyond float rounding."""
    if len(values) == 0:
        raise RuntimeError(f"{name}: no results")
    for i, value in enumerate(values):
        want = expected[i % len(expected)]
        if abs(float(value) - want) > REL_TOLERANCE * max(1.0, abs(want)):
            raise RuntimeError(f"{name}: item {i} returned {value}, expected {want}")


def batching_stats(app: Any, hostname: str, task_name: str) -> dict[str, Any]:
    """The worker's batching counters of one task (``inspect stats`` → pool → batching); {} if none yet."""
    replies = app.control.inspect([hostname], timeout=5.0).stats() or {}
    if hostname not in replies:
        raise RuntimeError(f"{hostname} did not answer inspect stats: {sorted(replies)}")
    stats: dict[str, Any] = replies[hostname].get("pool", {}).get("batching", {}).get(task_name, {})
    return stats


def warm_up(name: str, tasks: list[Any], worker: Worker, inputs: list[list[float]], reference: list[float],
            warmup: int) -> None:
    """Every input once through every task, then ``warmup`` items each; check every output."""
    for task in tasks:
        bulk = getattr(task, "gpu_batch", None) is not None
        check_outputs(f"{name} {task.name}", collect(send(task, inputs, bulk), worker), reference)
        items = [inputs[i % len(inputs)] for i in range(warmup)]
        check_outputs(f"{name} {task.name}", collect(send(task, items, bulk), worker), reference)


@dataclass
class WorkerInfo:
    ready_s: float
    stop_s: float | None = None
    left_behind: int | None = None


@contextlib.contextmanager
def started_worker(label: str, module_name: str, args: list[str], env: dict[str, str], processes: int,
                   task_attrs: dict[str, str], inputs: list[list[float]], reference: list[float], warmup: int,
                   log_dir: Path) -> Iterator[tuple[Worker, dict[str, Any], WorkerInfo]]:
    """Start one worker of ``module_name`` and warm it up; yields it with its tasks per path (``task_attrs``:
    path -> the task's name in ``module_name``); stops it (stop time, leftovers) and shows its loud log lines."""
    app_module = importlib.import_module(module_name)
    app_module.app.control.purge()  # leftovers of an interrupted run on a shared broker
    started = time.monotonic()
    with celery_worker(module_name, label, args, env, log_dir) as worker:
        print(f"  waiting for {processes} process(es) of {worker.hostname} ...", flush=True)
        wait_ready(app_module, worker, processes)
        info = WorkerInfo(time.monotonic() - started)
        print(f"  ready after {info.ready_s:.1f}s; warming up", flush=True)
        tasks = {path: getattr(app_module, attr) for path, attr in task_attrs.items()}
        warm_up(label, list({id(t): t for t in tasks.values()}.values()), worker, inputs, reference, warmup)
        yield worker, tasks, info
        print(f"  stopping {worker.hostname}", flush=True)
    info.stop_s, info.left_behind = worker.stop_s, worker.left_behind
    print_loud_lines(worker)
