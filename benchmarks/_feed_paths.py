"""What ``feed.py`` measures through: its two workers (celery-gpu and plain Celery) with this process as their
client, the paths that send items to them, the CPU of every party, the open loop, and the in-process loop."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks._feed_model import BATCH, SERIALIZERS, mlp_batch, noop_batch
from benchmarks._peers_stack import OpenLoop
from benchmarks._real_model_paths import celery_open_loop
from benchmarks.harness import (
    CpuSnapshot,
    Worker,
    batching_stats,
    celery_worker,
    collect,
    cpu_per_item,
    proc_cpu_s,
    wait_ready,
)

GPU_APP = "benchmarks._feed_gpu_app"
PLAIN_APP = "benchmarks._feed_plain_app"
#: The paths, in the order they are measured and reported.
PATHS = ("delay", "bulk", "packed", "plain_celery", "in_process")
SERVED = ("delay", "bulk", "packed", "plain_celery")  # through a worker
OPEN_LOOP_PATHS = ("delay", "bulk", "plain_celery")  # one item at a time: a pack of one is the bulk path


def supports_pack(task: Any) -> bool:
    """Whether this celery-gpu has packed submission (``submit_many(items, pack=...)``, issue 18)."""
    return "pack" in inspect.signature(task.submit_many).parameters


@dataclass
class Sender:
    """How a path sends items: ``many(task, items)`` (a result set) and ``one(task, item)`` (one result)."""

    many: Callable[[Any, list[Any]], Any]
    one: Callable[[Any, Any], Any] | None = None


def senders(serializer: str, pack: int) -> dict[str, Sender]:
    """Every path's way of sending items with ``serializer`` (a key of ``SERIALIZERS``); ``pack`` items per
    message on the packed path (plugged in only where celery-gpu has packs)."""
    from celery.result import ResultSet

    name = SERIALIZERS[serializer]

    def delay_one(task: Any, x: Any) -> Any:
        return task.apply_async((x,), serializer=name)  # .delay(x) with the serializer named

    def delay_many(task: Any, items: list[Any]) -> Any:
        return ResultSet([delay_one(task, x) for x in items], app=task.app)

    def bulk_many(task: Any, items: list[Any]) -> Any:
        if supports_pack(task):
            return task.submit_many(items, pack=False, serializer=name)
        return task.submit_many(items, serializer=name)

    def packed_many(task: Any, items: list[Any]) -> Any:
        return task.submit_many(items, pack=pack, serializer=name)

    return {"delay": Sender(delay_many, delay_one),
            "bulk": Sender(bulk_many, lambda task, x: bulk_many(task, [x]).results[0]),
            "packed": Sender(packed_many), "plain_celery": Sender(delay_many, delay_one)}


def broker_probe(backend_app: Any, broker_pid: int | None) -> Callable[[], float | None]:
    """The broker's CPU seconds so far: the result backend's Redis (``INFO cpu``), plus the RabbitMQ server's
    process (``/proc``) when RabbitMQ is the broker; None where Redis does not answer ``INFO``."""

    def probe() -> float | None:
        try:
            info = backend_app.backend.client.info("cpu")
            redis_s = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        except Exception:
            return None
        return redis_s + (proc_cpu_s(broker_pid) if broker_pid else 0.0)

    return probe


def rabbitmq_pid() -> int | None:
    """The pid of the local RabbitMQ server (``beam.smp``), read from ``/proc``; None if there is none."""
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == "beam.smp":
                return int(entry.name)
    return None


@dataclass
class Run:
    """One throughput run of one path: items/s and the CPU of each party in microseconds per item."""

    items: int
    seconds: float
    cpu_us: dict[str, float | None]
    mean_batch: float | None = None

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds


@dataclass
class WorkerStack:
    """A running worker and its tasks by model (``noop``, ``mlp``)."""

    label: str
    worker: Worker
    module: Any
    ready_s: float
    batched: bool
    probe: Callable[[], float | None] = field(default=lambda: None)

    def task(self, model: str) -> Any:
        return getattr(self.module, model)

    def counters(self, model: str) -> tuple[int, int]:
        if not self.batched:
            return 0, 0
        stats = batching_stats(self.module.app, self.worker.hostname, self.task(model).name)
        return int(stats.get("items", 0)), int(stats.get("batches", 0))

    def measured(self, model: str, send: Callable[[Any, list[Any]], Any], items: list[Any]
                 ) -> tuple[Run, list[Any]]:
        """Send every item at once and wait for every result, the CPU of each party around it."""
        counted = self.counters(model)
        before = CpuSnapshot.take(self.worker, self.probe)
        started = time.perf_counter()
        values = collect(send(self.task(model), items), self.worker)
        seconds = time.perf_counter() - started
        after = CpuSnapshot.take(self.worker, self.probe)
        now = self.counters(model)
        batch = (now[0] - counted[0]) / (now[1] - counted[1]) if now[1] > counted[1] else None
        return Run(len(items), seconds, to_us(cpu_per_item(before, after, len(items))), batch), values

    def open_loop(self, model: str, one: Callable[[Any, Any], Any], items: list[Any], rate: float,
                  count: int) -> OpenLoop:
        task = self.task(model)
        return celery_open_loop(task, lambda x: one(task, x), self.worker, items, rate, count)


def to_us(cpu_ms: dict[str, float | None]) -> dict[str, float | None]:
    """CPU milliseconds per item by party -> microseconds, with ``worker`` = main process + its children."""
    us = {k: None if v is None else round(1000 * v, 1) for k, v in cpu_ms.items()}
    if us.get("worker_main") is not None and us.get("worker_children") is not None:
        us["worker"] = round(us["worker_main"] + us["worker_children"], 1)  # type: ignore[operator]
    return us


@contextlib.contextmanager
def started(label: str, module_name: str, args: list[str], env: dict[str, str], processes: int, batched: bool,
            log_dir: Path) -> Iterator[WorkerStack]:
    """A worker of ``module_name``, every one of its ``processes`` processes answering; stopped on the way out."""
    module = importlib.import_module(module_name)
    module.app.control.purge()  # leftovers of an interrupted run on a shared broker
    t0 = time.monotonic()
    with celery_worker(module_name, label, args, env, log_dir) as worker:
        print(f"  waiting for {processes} process(es) of {worker.hostname} ...", flush=True)
        wait_ready(module, worker, processes)
        stack = WorkerStack(label, worker, module, time.monotonic() - t0, batched)
        print(f"  ready after {stack.ready_s:.1f}s", flush=True)
        yield stack


def round_trips(stacks: dict[str, tuple[WorkerStack, Sender]], model: str, items: list[Any], count: int
                ) -> dict[str, list[float]]:
    """Sequential single-item round trips (``one(x).get()``), the paths taking turns, the order rotating."""
    names = list(stacks)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(count):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            stack, sender = stacks[name]
            assert sender.one is not None
            t0 = time.perf_counter()
            sender.one(stack.task(model), items[i % len(items)]).get(timeout=60)
            times[name].append(time.perf_counter() - t0)
    return times


def in_process(model: str, mlp: Any, device: str, items: list[Any]) -> tuple[Run, list[Any]]:
    """The in-process batched loop: the items through the model in batches of ``BATCH`` in this process."""
    run_batch: Callable[[list[Any]], list[Any]] = (
        noop_batch if model == "noop" else (lambda xs: mlp_batch(mlp, device, xs)))
    run_batch(items[:BATCH])  # warm
    before = os.times()
    started_at = time.perf_counter()
    values: list[Any] = []
    for start in range(0, len(items), BATCH):
        values.extend(run_batch(items[start:start + BATCH]))
    seconds = time.perf_counter() - started_at
    after = os.times()
    client = round(1e6 * (after.user + after.system - before.user - before.system) / len(items), 1)
    return Run(len(items), seconds, {"client": client, "total": client}, float(BATCH)), values
