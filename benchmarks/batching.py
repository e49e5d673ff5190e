"""How far does batching take celery-gpu past plain Celery, end to end, on a small model?

The anchor workload of ``benchmarks/overhead.py`` (MLP 512 -> 2048 -> 2048 -> 512, float32, one thread per
process, one 1x512 input per task sent as a list of floats, one float back) through five paths on one broker:

1. ``batched_bulk``: a celery-gpu worker (``CELERY_GPU_DEVICES=cpu``, ``--per-device`` device processes, one by
   default), the batched task ``@gpu.task(batch=64, max_wait_ms=5)``, items sent with ``task.submit_many``.
2. ``batched_delay``: the same worker and task, each item sent with its own ``.delay(x)``.
3. ``unbatched``: the same worker, a plain ``@gpu.task`` of one item, sent with ``.delay(x)``.
4. ``plain_celery``: stock Celery prefork, ``--concurrency 2``, spawned children, the model built in
   ``worker_process_init`` (``benchmarks._overhead_plain_app``).
5. ``in_process``: no Celery: the items through the model in batches of 64 in this process (the ceiling).

Both workers are started (and warmed up) together; the throughput of one path is measured at a time while the
other worker idles. Per path: items/s end to end (N items submitted as fast as possible, until every result is
back), the p50 of sequential single-item round trips (the paths taking turns, one round trip each, so a slow
moment of a shared machine hits every path alike), the mean batch size (from the worker's ``inspect stats``),
and the CPU time per item of the worker (main process and device processes apart), of this client and of the
broker. The last line printed is one JSON object (also written to ``--out``).

Usage::

    python benchmarks/batching.py [--quick] [--broker redis://127.0.0.1:6379/10] [--out results.json]
                                  [--paths batched_bulk,plain_celery] [--serializer msgpack] [--per-device 1]
                                  [--profile DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks._batching_model import BATCH_SIZE, MAX_WAIT_MS, SERIALIZER_ENV, infer_batch  # noqa: E402
from benchmarks._batching_profile import profiled  # noqa: E402
from benchmarks._overhead_model import build_model, infer, make_inputs  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    CpuSnapshot,
    Worker,
    WorkerInfo,
    batching_stats,
    broker_cpu_probe,
    check_outputs,
    child_env,
    collect,
    command_line,
    cpu_per_item,
    descendants,
    emit,
    exit_on_sigterm,
    machine,
    open_broker,
    percentile,
    round_trips,
    run_guarded,
    send,
    source_after,
    source_state,
    started_worker,
)

PATHS = ("in_process", "batched_bulk", "batched_delay", "unbatched", "plain_celery")
GPU_PATHS = ("batched_bulk", "batched_delay", "unbatched")  # served by one celery-gpu worker, one after another
GPU_APP = "benchmarks._batching_gpu_app"
PLAIN_APP = "benchmarks._overhead_plain_app"
# The task of each path, by its name in the worker's app module (the plain app has no batched task).
TASKS = {"batched_bulk": "mlp_batch", "batched_delay": "mlp_batch", "unbatched": "mlp", "plain_celery": "mlp"}
PLAIN_PROCESSES = 2  # prefork children of the plain worker, as in overhead.py
INPUT_POOL = 32  # distinct inputs, cycled through
GOAL_RATIO = 20.0  # batched_bulk items/s over plain Celery's
GOAL_IDLE_LATENCY_MS = 1.0  # batched p50 minus plain p50, at most
WARM_ROUND_TRIPS = 10


@dataclass(frozen=True)
class Sizes:
    """How many items each measurement uses."""

    items: int  # throughput run of every path
    sequential: int  # round trips for the p50
    warmup: int  # items sent in bulk before the measurements (after every input was seen once)

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        return cls(items=1000, sequential=50, warmup=100) if quick else cls(items=2000, sequential=200, warmup=200)


@dataclass
class PathResult:
    """The figures of one path."""

    name: str
    items_per_s: float
    p50_ms: float
    seconds: float  # the throughput run, submit to last result
    submit_s: float | None = None  # of which: sending every item (Celery paths)
    mean_batch: float | None = None  # batched paths: items / batches during the throughput run
    batches: int | None = None
    calls: int | None = None  # calls of the batch function (more than batches only when a batch failed)
    cpu_ms_per_item: dict[str, float | None] = field(default_factory=dict)
    p90_ms: float | None = None
    profile: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "items_per_s": round(self.items_per_s, 2), "p50_ms": round(self.p50_ms, 3),
            "p90_ms": None if self.p90_ms is None else round(self.p90_ms, 3),
            "seconds": round(self.seconds, 3),
            "submit_s": None if self.submit_s is None else round(self.submit_s, 3),
            "mean_batch": None if self.mean_batch is None else round(self.mean_batch, 2),
            "batches": self.batches, "calls": self.calls, "cpu_ms_per_item": self.cpu_ms_per_item,
        }
        if self.profile is not None:
            out["profile"] = self.profile
        return out


# -- Celery paths --------------------------------------------------------------------------------------------


def measure_celery(name: str, task: Any, worker: Worker, inputs: list[list[float]], reference: list[float],
                   sizes: Sizes, broker_cpu: Callable[[], float | None], profile_dir: Path | None) -> PathResult:
    """Throughput (with CPU accounting and batch counters) and sequential latency of one path of a worker."""
    bulk = name == "batched_bulk"
    batched = name in ("batched_bulk", "batched_delay")
    round_trips(task, inputs, WARM_ROUND_TRIPS, bulk)
    items = [inputs[i % len(inputs)] for i in range(sizes.items)]
    stats_before = batching_stats(task.app, worker.hostname, task.name) if batched else {}

    targets = {"main": worker.proc.pid, "client": os.getpid(),
               **{f"child-{pid}": pid for pid in sorted(descendants(worker.proc.pid))}}
    with profiled(targets, profile_dir, name) as profile:
        cpu_before = CpuSnapshot.take(worker, broker_cpu)
        started = time.perf_counter()
        result_set = send(task, items, bulk)
        submit_s = time.perf_counter() - started
        values = collect(result_set, worker)
        elapsed = time.perf_counter() - started
        cpu_after = CpuSnapshot.take(worker, broker_cpu)
    check_outputs(name, values, reference)

    result = PathResult(name, sizes.items / elapsed, 0.0, elapsed, submit_s=submit_s,
                        cpu_ms_per_item=cpu_per_item(cpu_before, cpu_after, sizes.items),
                        profile=profile or None)
    if batched:
        stats_after = batching_stats(task.app, worker.hostname, task.name)
        result.batches = int(stats_after.get("batches", 0)) - int(stats_before.get("batches", 0))
        result.calls = int(stats_after.get("calls", 0)) - int(stats_before.get("calls", 0))
        run_items = int(stats_after.get("items", 0)) - int(stats_before.get("items", 0))
        result.mean_batch = run_items / result.batches if result.batches else None
        if run_items != sizes.items:
            print(f"  note: the worker counted {run_items} batched items for {sizes.items} sent", flush=True)

    print(f"  {name}: {result.items_per_s:.1f} items/s ({sizes.items} in {elapsed:.2f}s, sent in {submit_s:.2f}s)"
          f"{'' if result.mean_batch is None else f', mean batch {result.mean_batch:.1f}'}; "
          f"CPU ms/item {result.cpu_ms_per_item}", flush=True)
    return result


def interleaved_latency(tasks: dict[str, Any], inputs: list[list[float]], count: int,
                        results: dict[str, PathResult]) -> None:
    """p50/p90 of ``count`` sequential single-item round trips per path, the paths taking turns (the order
    rotating every round), so slow moments of a shared machine hit every path alike."""
    names = list(tasks)
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        round_trips(tasks[name], inputs, WARM_ROUND_TRIPS, name == "batched_bulk")
    for i in range(count):
        turn = names[i % len(names):] + names[:i % len(names)]
        for name in turn:
            times[name] += round_trips(tasks[name], [inputs[i % len(inputs)]], 1, name == "batched_bulk")
    for name in names:
        r = results[name]
        r.p50_ms, r.p90_ms = 1000 * statistics.median(times[name]), 1000 * percentile(times[name], 0.9)
        print(f"  {name}: p50 {r.p50_ms:.2f} ms, p90 {r.p90_ms:.2f} ms", flush=True)


# -- in-process ceiling --------------------------------------------------------------------------------------


def in_process(model: Any, inputs: list[list[float]], reference: list[float], sizes: Sizes) -> PathResult:
    """The items through the model in batches of ``BATCH_SIZE`` in this process; p50 of single-item calls."""
    items = [inputs[i % len(inputs)] for i in range(sizes.items)]
    infer_batch(model, items[:BATCH_SIZE])  # warm
    before = CpuSnapshot.take(None, lambda: None)
    started = time.perf_counter()
    values: list[float] = []
    for start in range(0, len(items), BATCH_SIZE):
        values.extend(infer_batch(model, items[start:start + BATCH_SIZE]))
    elapsed = time.perf_counter() - started
    after = CpuSnapshot.take(None, lambda: None)
    check_outputs("in_process", values, reference)
    times = []
    for i in range(sizes.sequential):
        t0 = time.perf_counter()
        infer(model, inputs[i % len(inputs)])
        times.append(time.perf_counter() - t0)
    result = PathResult("in_process", sizes.items / elapsed, 1000 * statistics.median(times), elapsed,
                        mean_batch=sizes.items / -(-sizes.items // BATCH_SIZE),
                        cpu_ms_per_item=cpu_per_item(before, after, sizes.items),
                        p90_ms=1000 * percentile(times, 0.9))
    print(f"  in_process: {result.items_per_s:.1f} items/s; single-item p50 {result.p50_ms:.3f} ms", flush=True)
    return result


# -- report --------------------------------------------------------------------------------------------------


def report(results: dict[str, PathResult], workers: dict[str, WorkerInfo], sizes: Sizes, args: argparse.Namespace,
           broker: str, command: str) -> dict[str, Any]:
    """Print the table and build the JSON summary."""
    plain = results.get("plain_celery")

    def ratio(path: str) -> float | None:
        if plain is None or path not in results:
            return None
        return round(results[path].items_per_s / plain.items_per_s, 3)

    print()
    print(f"{'path':<14} {'items/s':>9} {'x plain':>8} {'p50 ms':>8} {'batch':>6} {'CPU ms/item':>12} "
          f"{'main':>6} {'procs':>6} {'client':>7} {'broker':>7}")
    print("-" * 94)

    def cell(value: float | None, width: int, digits: int = 2) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for name, r in results.items():
        cpu = r.cpu_ms_per_item
        print(f"{name:<14} {r.items_per_s:>9.1f} {cell(ratio(name), 8)} {r.p50_ms:>8.2f} {cell(r.mean_batch, 6, 1)} "
              f"{cell(cpu.get('total'), 12, 3)} {cell(cpu.get('worker_main'), 6)} "
              f"{cell(cpu.get('worker_children'), 6)} {cell(cpu.get('client'), 7)} {cell(cpu.get('broker'), 7)}")

    batched_ratio = ratio("batched_bulk")
    idle = None
    if plain is not None and "batched_delay" in results:
        idle = round(results["batched_delay"].p50_ms - plain.p50_ms, 3)
    met = (batched_ratio is not None and idle is not None
           and batched_ratio >= GOAL_RATIO and idle <= GOAL_IDLE_LATENCY_MS)
    summary: dict[str, Any] = {
        "benchmark": "batching",
        "quick": args.quick,
        "broker": broker,
        "machine": machine(),
        "sizes": {**asdict(sizes), "batch": BATCH_SIZE, "max_wait_ms": MAX_WAIT_MS, "per_device": args.per_device,
                  "plain_concurrency": PLAIN_PROCESSES, "serializer": args.serializer},
        "paths": {name: r.as_json() for name, r in results.items()},
        "items_per_s": {name: round(r.items_per_s, 2) for name, r in results.items()},
        "p50_ms": {name: round(r.p50_ms, 3) for name, r in results.items()},
        "mean_batch": {name: None if r.mean_batch is None else round(r.mean_batch, 2) for name, r in results.items()},
        "ratio_vs_plain_celery": batched_ratio,
        "ratio_vs_plain_celery_by_path": {name: ratio(name) for name in results if name != "plain_celery"},
        "idle_latency_ms_over_plain": idle,
        "goal": {"ratio": GOAL_RATIO, "idle_latency_ms_over_plain": GOAL_IDLE_LATENCY_MS, "met": met},
        "workers": {name: asdict(w) for name, w in workers.items()},
        "outputs_checked": True,  # every path's outputs matched the in-process reference, or the run failed
        "command": command,
    }
    print()
    if batched_ratio is not None:
        print(f"batched_bulk / plain_celery items/s: {batched_ratio:.2f}x (goal {GOAL_RATIO:.0f}x)")
    if idle is not None:
        print(f"batched p50 - plain p50: {idle:+.2f} ms (goal <= {GOAL_IDLE_LATENCY_MS} ms)")
    print(f"goal met: {met}")
    return summary


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (1000 items, 50 round trips)")
    parser.add_argument("--broker", help="Redis URL to use (default: an embedded Redis started here)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line to this file")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--serializer", default="json", choices=("json", "msgpack"),
                        help="task and result serializer of both workers and the client")
    parser.add_argument("--per-device", type=int, default=1,
                        help="device processes of the celery-gpu worker (default 1: the 2 cores also hold the "
                             "worker's main process, the client and Redis)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample the worker's main process, its children and this client with py-spy during "
                             "each throughput run; raw stacks to DIR (this costs CPU: do not record such a run's "
                             "figures)")
    args = parser.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    if args.per_device < 1:
        parser.error("--per-device must be >= 1")
    return args


def start_workers(stack: contextlib.ExitStack, url: str, paths: list[str], args: argparse.Namespace,
                  inputs: list[list[float]], reference: list[float], sizes: Sizes, log_dir: Path,
                  workers: dict[str, WorkerInfo]) -> dict[str, tuple[Worker, Any]]:
    """Start (and warm up) the workers that ``paths`` need, for as long as ``stack``; (worker, task) per path."""
    started: list[tuple[str, Worker, dict[str, Any]]] = []
    gpu_paths = [p for p in paths if p in GPU_PATHS]
    if gpu_paths:
        print(f"\n[celery-gpu worker: {', '.join(gpu_paths)}]", flush=True)
        env = child_env(url, CELERY_GPU_DEVICES="cpu", CELERY_GPU_PER_DEVICE=str(args.per_device))
        worker, tasks, workers["celery_gpu"] = stack.enter_context(started_worker(
            "batching-gpu", GPU_APP, [], env, args.per_device, {p: TASKS[p] for p in gpu_paths}, inputs, reference,
            sizes.warmup, log_dir))
        started.append(("celery_gpu", worker, tasks))
    if "plain_celery" in paths:
        print("\n[plain Celery worker]", flush=True)
        worker_args = ["--pool", "prefork", "--concurrency", str(PLAIN_PROCESSES)]
        worker, tasks, workers["plain_celery"] = stack.enter_context(started_worker(
            "batching-plain", PLAIN_APP, worker_args, child_env(url), PLAIN_PROCESSES,
            {"plain_celery": TASKS["plain_celery"]}, inputs, reference, sizes.warmup, log_dir))
        started.append(("plain_celery", worker, tasks))
    by_path: dict[str, tuple[Worker, Any]] = {}
    for _, worker, tasks in started:
        by_path.update({p: (worker, t) for p, t in tasks.items()})
    return by_path


def run_paths(url: str, paths: list[str], sizes: Sizes, args: argparse.Namespace,
              ) -> tuple[dict[str, PathResult], dict[str, WorkerInfo]]:
    os.environ["OVERHEAD_BROKER"] = url  # read by the app modules when they are imported below
    os.environ[SERIALIZER_ENV] = args.serializer  # the same, and passed on to the workers by child_env
    inputs = make_inputs(INPUT_POOL)
    model = build_model()  # the reference outputs (and the in-process path); one thread here too
    reference = [infer(model, x) for x in inputs]
    results: dict[str, PathResult] = {}
    workers: dict[str, WorkerInfo] = {}
    with tempfile.TemporaryDirectory(prefix="batching-") as tmp:
        log_dir = Path(tmp)
        if "in_process" in paths:
            print("\n[in_process]", flush=True)
            results["in_process"] = in_process(model, inputs, reference, sizes)
        celery_paths = [p for p in paths if p in GPU_PATHS] + [p for p in paths if p == "plain_celery"]
        with contextlib.ExitStack() as stack:  # both workers up; only one of them busy at any time
            by_path = start_workers(stack, url, paths, args, inputs, reference, sizes, log_dir, workers)
            for name in celery_paths:
                print(f"\n[{name}: throughput]", flush=True)
                worker, task = by_path[name]
                broker_cpu = broker_cpu_probe(task.app)
                results[name] = measure_celery(name, task, worker, inputs, reference, sizes, broker_cpu,
                                               args.profile)
            if celery_paths:
                print(f"\n[latency: {sizes.sequential} round trips per path, taking turns]", flush=True)
                interleaved_latency({p: by_path[p][1] for p in celery_paths}, inputs, sizes.sequential, results)
    return {p: results[p] for p in PATHS if p in results}, workers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sizes = Sizes.for_run(args.quick)
    paths = [p for p in PATHS if p in args.paths.split(",")]
    command = command_line("batching.py", argv)
    started = time.monotonic()
    source = source_state()
    with contextlib.ExitStack() as stack:
        url, broker = open_broker(stack, args.broker)
        print(f"broker: {broker}; {os.cpu_count()} CPUs; sizes: {sizes}; serializer {args.serializer}; "
              f"{args.per_device} device process(es)", flush=True)
        # As overhead.py: drop the failure's pending results while Redis still runs.
        code, outcome = run_guarded(lambda: run_paths(url, paths, sizes, args))
        if outcome is None:
            return code
    results, workers = outcome
    summary = report(results, workers, sizes, args, broker, command)
    summary["source"] = source_after(source)
    summary["total_s"] = round(time.monotonic() - started, 1)
    print(f"total time: {summary['total_s']:.1f}s")
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
