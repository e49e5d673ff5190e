"""What ``real_model.py`` measures through: the celery-gpu worker of ``examples/embeddings`` and the plain Celery
worker (this process their client), the Ray Serve client script, and the in-process batched loop; every output
checked against the reference embeddings."""

from __future__ import annotations

import base64
import contextlib
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._peers_celery import _final_state
from benchmarks._peers_ray_stack import RAY_TIMEOUT, RayStack
from benchmarks._peers_stack import OpenLoop, Run, Stack
from benchmarks.harness import (
    READY_TIMEOUT,
    CpuSnapshot,
    Worker,
    batching_stats,
    broker_cpu_probe,
    celery_worker,
    collect,
    cpu_per_item,
    descendants,
    proc_cpu_s,
    wait_ready,
)

GPU_APP = "examples.embeddings.worker"
PLAIN_APP = "benchmarks._real_model_plain_app"
GPU_QUEUE = "real-model-celery-gpu"
EMBED_TASK = "embeddings.embed"
PACK = 64  # items per broker message on the packed path (where celery-gpu has packs)
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}  # largest |difference| of a unit vector's entry


def check_vectors(name: str, values: Any, reference: np.ndarray, tolerance: float) -> float:
    """Item ``i`` must be ``reference[i % len(reference)]`` within ``tolerance``; the largest difference seen."""
    got = np.asarray(values, dtype=np.float32)
    want = reference[np.arange(len(got)) % len(reference)]
    if len(got) == 0 or got.shape != want.shape:
        raise RuntimeError(f"{name}: {got.shape} returned, {want.shape} expected")
    diff = float(np.abs(got - want).max())
    if diff > tolerance:
        worst = int(np.abs(got - want).max(axis=1).argmax())
        raise RuntimeError(f"{name}: item {worst} differs from the reference by {diff:.2e} (> {tolerance:g})")
    return diff


def supports_pack(task: Any) -> bool:
    """Whether this celery-gpu has packed submission (``submit_many(..., pack=...)``, issue 18)."""
    return "pack" in inspect.signature(task.submit_many).parameters


class CeleryModelStack(Stack):
    """A ``celery worker`` subprocess serving one or more paths; this process is its client."""

    def __init__(self, label: str, worker: Worker, tasks: dict[str, Any], ready_s: float,
                 settings: dict[str, Any]) -> None:
        self.label, self.worker, self.tasks, self.ready_s, self.settings = label, worker, tasks, ready_s, settings
        self.paths = list(tasks)
        self._broker_cpu = broker_cpu_probe(next(iter(tasks.values())).app)

    def tree(self) -> set[int]:
        return {self.worker.proc.pid} | descendants(self.worker.proc.pid)

    def root(self) -> int | None:
        return self.worker.proc.pid

    def client_cpu_s(self) -> float:
        times = os.times()
        return times.user + times.system

    def broker_cpu_s(self) -> float | None:
        return self._broker_cpu()

    def batch_counters(self, path: str) -> tuple[int, int] | None:
        if not path.startswith("celery_gpu"):
            return None
        stats = batching_stats(self.tasks[path].app, self.worker.hostname, EMBED_TASK)
        return int(stats.get("items", 0)), int(stats.get("batches", 0))

    def send(self, path: str, items: list[str]) -> Any:
        from celery.result import ResultSet

        task = self.tasks[path]
        if path == "celery_gpu_packed":
            return task.submit_many(items, pack=PACK)
        if path == "celery_gpu_bulk":
            return task.submit_many(items, pack=False) if supports_pack(task) else task.submit_many(items)
        return ResultSet([task.delay(x) for x in items], app=task.app)

    def throughput(self, path: str, items: list[Any]) -> tuple[float, list[Any]]:
        started = time.perf_counter()
        values = collect(self.send(path, items), self.worker)
        return time.perf_counter() - started, values

    def measured(self, path: str, items: list[Any]) -> Run:
        """A throughput round with the CPU of each party: client, worker main process, its children, broker."""
        counted = self.batch_counters(path)
        before = CpuSnapshot.take(self.worker, self._broker_cpu)
        seconds, values = self.throughput(path, items)
        after = CpuSnapshot.take(self.worker, self._broker_cpu)
        mean_batch = None
        if counted is not None and (now := self.batch_counters(path)) is not None and now[1] > counted[1]:
            mean_batch = round((now[0] - counted[0]) / (now[1] - counted[1]), 2)
        return Run(seconds, values, cpu_per_item(before, after, len(items)), mean_batch)

    def open_loop(self, path: str, inputs: list[Any], rate: float, count: int) -> OpenLoop:
        task = self.tasks[path]
        if path == "celery_gpu_bulk":
            return celery_open_loop(task, lambda x: task.submit_many([x]).results[0], self.worker, inputs, rate, count)
        return celery_open_loop(task, lambda x: task.delay(x), self.worker, inputs, rate, count)


class ArrivalListener(threading.Thread):
    """Notes when each task's result is published (Celery's Redis backend publishes every stored result on the
    channel named by its key): one pattern subscription on the result keys, made before anything is sent, so
    no task id has to be chosen by the sender; the arrival time at the client, without Celery's consumer."""

    def __init__(self, backend: Any) -> None:
        super().__init__(name="arrival-listener", daemon=True)
        prefix = backend.task_keyprefix
        self.prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
        self.arrived: dict[str, float] = {}
        self._stop_event = threading.Event()
        self._pubsub = backend.client.pubsub()
        self._pubsub.psubscribe(self.prefix + "*")
        deadline = time.monotonic() + 30
        while (message := self._pubsub.get_message(timeout=1.0)) is None or message["type"] != "psubscribe":
            if time.monotonic() > deadline:
                raise TimeoutError("the result pattern was not subscribed in 30 s")

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                message = self._pubsub.get_message(timeout=0.2)
                if message is None or message["type"] != "pmessage":
                    continue
                now = time.perf_counter()
                channel = message["channel"]
                key = channel.decode() if isinstance(channel, bytes) else str(channel)
                if _final_state(message["data"]):
                    self.arrived.setdefault(key[len(self.prefix):], now)
        finally:
            self._pubsub.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def celery_open_loop(task: Any, send_one: Callable[[Any], Any], worker: Worker, inputs: list[Any], rate: float,
                     count: int) -> OpenLoop:
    """Item ``i`` sent at ``t0 + i / rate`` whatever came back; latency from that scheduled time to its result's
    publication (:class:`ArrivalListener`). Then every result is read back through Celery (and checked)."""
    from celery.result import ResultSet

    listener = ArrivalListener(task.app.backend)
    listener.start()
    results: list[Any] = []
    lags = [0.0] * count
    t0 = time.perf_counter() + 0.05
    try:
        for i in range(count):
            at = t0 + i / rate
            wait = at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            lags[i] = time.perf_counter() - at
            results.append(send_one(inputs[i % len(inputs)]))
        values = collect(ResultSet(results, app=task.app), worker)
        deadline = time.monotonic() + 10
        while any(r.id not in listener.arrived for r in results) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        listener.stop()
    missing = [r.id for r in results if r.id not in listener.arrived]
    if missing:
        raise RuntimeError(f"{len(missing)} result messages of {worker.hostname} never arrived")
    return OpenLoop([listener.arrived[r.id] - (t0 + i / rate) for i, r in enumerate(results)], lags, values)


def wait_pool_ready(app: Any, worker: Worker) -> None:
    """Until every device process of the celery-gpu worker has loaded the model (``inspect stats``)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        worker.check_alive()
        stats = app.control.inspect([worker.hostname], timeout=1.0).stats() or {}
        pool = stats.get(worker.hostname, {}).get("pool") or {}
        slots = [s for d in pool.get("devices", []) for s in d.get("slots", [])]
        if slots and all(s["state"] in ("idle", "busy") for s in slots):
            worker.pids |= {int(s["pid"]) for s in slots if s.get("pid")}
            return
        if slots and all(s["state"] == "failed" for s in slots):
            raise RuntimeError(f"every device process of {worker.hostname} failed:\n{worker.log_tail()}")
        time.sleep(0.3)
    raise TimeoutError(f"{worker.hostname} not ready in {READY_TIMEOUT:.0f}s:\n{worker.log_tail()}")


@contextlib.contextmanager
def celery_gpu_stack(env: dict[str, str], paths: list[str], settings: dict[str, Any],
                     log_dir: Path) -> Iterator[CeleryModelStack]:
    """The example's worker (celery-gpu pool), started and ready; this process's ``embed`` task is its client."""
    from examples.embeddings import worker as example

    example.app.control.purge()  # leftovers of an interrupted run on a shared broker
    started = time.monotonic()
    with celery_worker(GPU_APP, "real-gpu", [], env, log_dir) as worker:
        print(f"  waiting for the device processes of {worker.hostname} ...", flush=True)
        wait_pool_ready(example.app, worker)
        stack = CeleryModelStack("celery_gpu", worker, {p: example.embed for p in paths}, time.monotonic() - started,
                                 settings)
        print(f"  ready after {stack.ready_s:.1f}s", flush=True)
        yield stack


@contextlib.contextmanager
def plain_stack(env: dict[str, str], processes: int, log_dir: Path) -> Iterator[CeleryModelStack]:
    """Stock Celery prefork (spawned children, the model loaded in ``worker_process_init``), ready."""
    import importlib

    plain = importlib.import_module(PLAIN_APP)
    plain.app.control.purge()
    started = time.monotonic()
    args = ["--pool", "prefork", "--concurrency", str(processes)]
    with celery_worker(PLAIN_APP, "real-plain", args, env, log_dir) as worker:
        print(f"  waiting for {processes} children of {worker.hostname} ...", flush=True)
        wait_ready(plain, worker, processes)
        stack = CeleryModelStack("plain_celery", worker, {"plain_celery": plain.embed}, time.monotonic() - started,
                                 {"app": PLAIN_APP, "pool": "prefork", "concurrency": processes,
                                  "worker_pool_start_method": "spawn", "worker_prefetch_multiplier": 4})
        print(f"  ready after {stack.ready_s:.1f}s", flush=True)
        yield stack


def _vectors(answer: dict[str, Any]) -> list[Any]:
    raw = np.frombuffer(base64.b64decode(answer["values_f32"]), dtype=np.float32)
    return list(raw.reshape(-1, 384))


class MiniLMRayStack(RayStack):
    """The Ray client script of ``benchmarks._real_model_ray`` (embeddings come back as float32 rows)."""

    module = "benchmarks._real_model_ray"

    def warm_up(self, count: int) -> list[Any]:  # type: ignore[override]
        return _vectors(self.request({"cmd": "warmup", "count": count}))

    def throughput(self, path: str, items: list[Any]) -> tuple[float, list[Any]]:  # type: ignore[override]
        answer = self.request({"cmd": "throughput", "count": len(items)})
        return float(answer["seconds"]), _vectors(answer)

    def open_loop(self, path: str, inputs: list[Any], rate: float, count: int) -> OpenLoop:
        answer = self.request({"cmd": "open_loop", "rate": rate, "count": count}, timeout=RAY_TIMEOUT + count / rate)
        return OpenLoop([float(v) for v in answer["latencies_s"]], [float(v) for v in answer["lag_s"]],
                        _vectors(answer))


_embedder: Any = None  # in a process of InProcess's pool: the model


def _load(device: str, dtype: str) -> None:
    global _embedder
    import torch

    from examples.embeddings.model import Embedder

    torch.set_num_threads(1)
    _embedder = Embedder(device, dtype)
    _embedder(["warm-up"])


def _embed(texts: list[str]) -> tuple[int, Any]:
    return os.getpid(), _embedder(texts)


class InProcess:
    """The in-process batched loop (no Celery): the ceiling. On a GPU, this process drives it; on the CPU,
    ``processes`` spawned processes of one torch thread each take batches from one queue, as many model
    processes as the other paths have (one process of two threads ran 2-4x slower on a busy 2-core machine)."""

    def __init__(self, device: str, dtype: str, processes: int, embedder: Any) -> None:
        self.embedder = embedder
        self.pool: Any = None
        if device == "cpu" and processes > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_load, initargs=(device, dtype))
            # every process started and its model loaded before anything is timed
            list(self.pool.map(_embed, [["warm-up"]] * (4 * processes)))
            self.pids = set(self.pool._processes)  # all of them, whichever ran the warm-up

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def round(self, items: list[str], batch: int) -> Run:
        chunks = [items[start:start + batch] for start in range(0, len(items), batch)]
        pids = self.pids if self.pool is not None else set()
        before, children = os.times(), sum(proc_cpu_s(p) for p in pids)
        started = time.perf_counter()
        if self.pool is None:
            values = [v for chunk in chunks for v in self.embedder(chunk)]
        else:
            values = [v for _, vectors in self.pool.map(_embed, chunks) for v in vectors]
        seconds = time.perf_counter() - started
        after = os.times()
        client = 1000 * (after.user + after.system - before.user - before.system) / len(items)
        workers = 1000 * (sum(proc_cpu_s(p) for p in pids) - children) / len(items)
        cpu = {"client": round(client, 4), "worker_children": round(workers, 4) if pids else None,
               "total": round(client + workers, 4)}
        return Run(seconds, values, cpu, float(batch))
