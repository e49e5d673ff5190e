"""The Celery stacks of ``peers.py``: the celery-gpu worker of ``batching.py``, the plain Celery worker of
``overhead.py`` and the celery-batches worker (from its own virtualenv), each started and warmed up, with this
process as their client; and the open loop that times each result's arrival on its Redis channel."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks._batching_model import BATCH_SIZE, MAX_WAIT_MS, serializer_conf
from benchmarks._peers_stack import PROCESSES, OpenLoop, Stack
from benchmarks._peers_venvs import peer_env
from benchmarks.harness import (
    Worker,
    batching_stats,
    broker_cpu_probe,
    celery_worker,
    check_outputs,
    child_env,
    collect,
    descendants,
    send,
    started_worker,
    wait_ready,
    warm_up,
)

GPU_APP = "benchmarks._batching_gpu_app"
PLAIN_APP = "benchmarks._overhead_plain_app"
BATCHES_APP = "benchmarks._peers_batches_app"
# The celery-batches worker's queue and task names: the same as QUEUE / MLP_TASK / WHOAMI_TASK of
# benchmarks/_peers_batches_app.py (which this process cannot import: it needs celery-batches, hence Celery < 5.7).
BATCHES_QUEUE = "peers-celery-batches"
BATCHES_MLP = "peers_batches.mlp"
BATCHES_WHOAMI = "peers_batches.whoami"
BATCHES_STATS_KEY = "peers-celery-batches-stats"
PACK = 256  # items per broker message on the packed path (submit_many(items, pack=PACK), where celery-gpu has it)
BATCHES_PREFETCH = 128  # worker_prefetch_multiplier: 2 children x 128 = 2 full batches per child


class CeleryStack(Stack):
    """A ``celery worker`` subprocess; the client is this process."""

    def __init__(self, label: str, worker: Worker, tasks: dict[str, Any], ready_s: float,
                 settings: dict[str, Any], counters: Callable[[str], tuple[int, int] | None] | None = None) -> None:
        self.label, self.worker, self.tasks, self.ready_s, self.settings = label, worker, tasks, ready_s, settings
        self.paths = list(tasks)
        self._broker_cpu = broker_cpu_probe(next(iter(tasks.values())).app)
        self._counters = counters

    def batch_counters(self, path: str) -> tuple[int, int] | None:
        return None if self._counters is None else self._counters(path)

    def tree(self) -> set[int]:
        return {self.worker.proc.pid} | descendants(self.worker.proc.pid)

    def root(self) -> int | None:
        return self.worker.proc.pid

    def client_cpu_s(self) -> float:
        times = os.times()
        return times.user + times.system

    def broker_cpu_s(self) -> float | None:
        return self._broker_cpu()

    def throughput(self, path: str, items: list[list[float]]) -> tuple[float, list[float]]:
        started = time.perf_counter()
        if path == "celery_gpu_packed":  # many items per broker message (issue 18)
            result_set = self.tasks[path].submit_many(items, pack=PACK)
        else:
            result_set = send(self.tasks[path], items, path == "celery_gpu_bulk")
        values = [float(v) for v in collect(result_set, self.worker)]
        return time.perf_counter() - started, values

    def open_loop(self, path: str, inputs: list[list[float]], rate: float, count: int) -> OpenLoop:
        return celery_open_loop(self.tasks[path], path == "celery_gpu_bulk", self.worker, inputs, rate, count)


class ResultListener(threading.Thread):
    """Notes when each awaited task's result is published on its Redis channel (Celery's Redis backend publishes
    every stored result on the channel named by its key): the arrival time at the client, whatever order the
    results come in, without Celery's result consumer."""

    def __init__(self, client: Any, keys: list[str]) -> None:
        super().__init__(name="result-listener", daemon=True)
        self.arrived: dict[str, float] = {}
        self._keys = set(keys)
        self._stop_event = threading.Event()
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(*keys)
        confirmed = 0
        deadline = time.monotonic() + 30
        while confirmed < len(keys):  # every SUBSCRIBE confirmed before anything is sent
            message = self._pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "subscribe":
                confirmed += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"{confirmed} of {len(keys)} result channels subscribed")

    def run(self) -> None:
        try:
            while len(self.arrived) < len(self._keys) and not self._stop_event.is_set():
                message = self._pubsub.get_message(timeout=0.2)
                if message is None or message["type"] != "message":
                    continue
                now = time.perf_counter()
                channel = message["channel"]
                key = channel.decode() if isinstance(channel, bytes) else str(channel)
                if _final_state(message["data"]):
                    self.arrived.setdefault(key, now)
        finally:
            self._pubsub.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def _final_state(data: Any) -> bool:
    """Whether a published result meta is a final state (not STARTED/RETRY); true when it cannot be read."""
    try:
        status = json.loads(data).get("status")
    except (ValueError, AttributeError, TypeError):
        return True
    return status not in ("STARTED", "RETRY", "RECEIVED", "PENDING")


def celery_open_loop(task: Any, bulk: bool, worker: Worker, inputs: list[list[float]], rate: float,
                     count: int) -> OpenLoop:
    """Item ``i`` sent at ``t0 + i / rate`` (``submit_many([x])`` or ``apply_async``), with a task id chosen here
    so that its result channel is subscribed before it is sent; latency from the scheduled time to the result
    message's arrival. Then every result is read back through Celery (and checked by the caller)."""
    from celery.result import ResultSet

    backend = task.app.backend
    ids = [str(uuid.uuid4()) for _ in range(count)]
    keys = []
    for task_id in ids:
        key = backend.get_key_for_task(task_id)
        keys.append(key.decode() if isinstance(key, bytes) else str(key))
    listener = ResultListener(backend.client, keys)
    listener.start()
    results: list[Any] = []
    lags = [0.0] * count
    t0 = time.perf_counter() + 0.05
    try:
        for i, task_id in enumerate(ids):
            at = t0 + i / rate
            wait = at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            lags[i] = time.perf_counter() - at
            x = inputs[i % len(inputs)]
            if bulk:
                results.extend(task.submit_many([x], task_id=task_id).results)
            else:
                results.append(task.apply_async((x,), task_id=task_id))
        values = [float(v) for v in collect(ResultSet(results, app=task.app), worker)]
        listener.join(timeout=10)
    finally:
        listener.stop()
    missing = [k for k in keys if k not in listener.arrived]
    if missing:
        raise RuntimeError(f"{len(missing)} result messages of {worker.hostname} never arrived (e.g. {missing[0]})")
    latencies = [listener.arrived[key] - (t0 + i / rate) for i, key in enumerate(keys)]
    return OpenLoop(latencies, lags, values)


@contextlib.contextmanager
def celery_gpu_stack(url: str, paths: list[str], inputs: list[list[float]], reference: list[float], warmup: int,
                     per_device: int, log_dir: Path) -> Iterator[CeleryStack]:
    """``batching.py``'s celery-gpu worker (``started_worker``: readiness, warm-up with checked outputs)."""
    env = child_env(url, CELERY_GPU_DEVICES="cpu", CELERY_GPU_PER_DEVICE=str(per_device))
    with started_worker("peers-gpu", GPU_APP, [], env, per_device, {p: "mlp_batch" for p in paths}, inputs,
                        reference, warmup, log_dir) as (worker, by_path, info):

        def counters(path: str) -> tuple[int, int]:
            task = by_path[path]
            stats = batching_stats(task.app, worker.hostname, task.name)
            return int(stats.get("items", 0)), int(stats.get("batches", 0))

        if "celery_gpu_packed" in by_path:  # the packed path's own way through the worker, warmed and checked too
            packed = by_path["celery_gpu_packed"]
            items = [inputs[i % len(inputs)] for i in range(len(inputs) + warmup)]
            check_outputs("celery_gpu_packed", collect(packed.submit_many(items, pack=PACK), worker), reference)
        yield CeleryStack("celery_gpu", worker, by_path, info.ready_s,
                          {"app": GPU_APP, "CELERY_GPU_DEVICES": "cpu", "CELERY_GPU_PER_DEVICE": per_device,
                           "batch": BATCH_SIZE, "max_wait_ms": MAX_WAIT_MS}, counters)


@contextlib.contextmanager
def plain_stack(url: str, inputs: list[list[float]], reference: list[float], warmup: int,
                log_dir: Path) -> Iterator[CeleryStack]:
    """``overhead.py``'s plain Celery worker: prefork, spawned children, the model built once per child."""
    args = ["--pool", "prefork", "--concurrency", str(PROCESSES)]
    with started_worker("peers-plain", PLAIN_APP, args, child_env(url), PROCESSES, {"plain_celery": "mlp"}, inputs,
                        reference, warmup, log_dir) as (worker, tasks, info):
        yield CeleryStack("plain_celery", worker, {"plain_celery": tasks["plain_celery"]}, info.ready_s,
                          {"app": PLAIN_APP, "pool": "prefork", "concurrency": PROCESSES,
                           "worker_pool_start_method": "spawn", "worker_prefetch_multiplier": 4})


def batches_client(url: str) -> types.ModuleType:
    """Stand-ins of the celery-batches worker's tasks for this process (Celery 5.7): the same names and queue,
    never run here. A module object with ``app``, ``mlp`` and ``whoami``, as ``harness.wait_ready`` expects."""
    from celery import Celery

    app = Celery("peers_batches_client", broker=url, backend=url)
    app.conf.update(task_default_queue=BATCHES_QUEUE, broker_connection_retry_on_startup=True, result_expires=600,
                    **serializer_conf())

    def elsewhere(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("runs on the celery-batches worker only")

    client = types.ModuleType("peers_batches_client")
    setattr(client, "app", app)  # noqa: B010  (a module object has no declared attributes)
    setattr(client, "mlp", app.task(name=BATCHES_MLP)(elsewhere))  # noqa: B010
    setattr(client, "whoami", app.task(name=BATCHES_WHOAMI)(elsewhere))  # noqa: B010
    return client


@contextlib.contextmanager
def batches_stack(url: str, python: str, pool: str, prefetch: int, inputs: list[list[float]],
                  reference: list[float], warmup: int, log_dir: Path) -> Iterator[CeleryStack]:
    """The celery-batches worker, from its own virtualenv: readiness and warm-up as for the other workers."""
    client = batches_client(url)
    client.app.control.purge()  # leftovers of an interrupted run on a shared broker
    args = ["--pool", pool, "--concurrency", str(PROCESSES)]
    processes = PROCESSES if pool == "prefork" else 1  # threads and solo run the tasks in the main process
    env = peer_env(url, PEERS_BATCHES_PREFETCH=str(prefetch))
    started = time.monotonic()
    with celery_worker(BATCHES_APP, "peers-batches", args, env, log_dir, python=python) as worker:
        print(f"  waiting for {processes} process(es) of {worker.hostname} ...", flush=True)
        wait_ready(client, worker, processes)
        ready_s = time.monotonic() - started
        print(f"  ready after {ready_s:.1f}s; warming up", flush=True)
        warm_up("peers-batches", [client.mlp], worker, inputs, reference, warmup)
        redis = client.app.backend.client

        def counters(path: str) -> tuple[int, int]:
            raw = redis.hgetall(BATCHES_STATS_KEY)  # written by the worker's batch task, one HINCRBY per batch
            stats = {k.decode() if isinstance(k, bytes) else str(k): int(v) for k, v in raw.items()}
            return stats.get("items", 0), stats.get("batches", 0)

        yield CeleryStack("celery_batches", worker, {"celery_batches": client.mlp}, ready_s,
                          {"app": BATCHES_APP, "pool": pool, "concurrency": PROCESSES,
                           "worker_prefetch_multiplier": prefetch, "flush_every": BATCH_SIZE,
                           "flush_interval_s": MAX_WAIT_MS / 1000, "results": "app.backend.mark_as_done per request"},
                          counters)
        print(f"  stopping {worker.hostname}", flush=True)
