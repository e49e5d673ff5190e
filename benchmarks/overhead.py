"""What does running a model through celery-gpu cost, next to the usual alternatives?

The same small-MLP inference (512 -> 2048 -> 2048 -> 512, float32, one thread per process, one 1x512 input
per item sent as a JSON list of floats, the output's sum returned) runs through four paths on one broker:

1. ``celery_gpu``: a ``celery -A ... worker`` with the celery-gpu pool on the ``cpu`` device, two device
   processes (``CELERY_GPU_DEVICES=cpu CELERY_GPU_PER_DEVICE=2``), the model built in ``@gpu.setup``.
2. ``plain_celery``: stock Celery prefork, ``--concurrency 2``, spawned children, the model built in a
   ``worker_process_init`` handler.
3. ``subprocess``: ``subprocess.run([python, "-c", ...])`` per item: import torch, build the model, run one input.
4. ``process``: a spawned ``multiprocessing.Process`` per item, doing the same.

For the Celery paths: throughput is N ``.delay`` calls sent as fast as possible and all their results
collected (items/s end to end, the client included), and latency is the p50 of M sequential
``.delay(x).get()`` round trips. For the naive paths every item is timed alone: items/s = 1 / mean time, p50 is
the median time. The last line printed is one JSON object (also written to ``--out``).

Usage::

    python benchmarks/overhead.py [--quick] [--broker redis://127.0.0.1:6379/10] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks._overhead_model import make_inputs  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    REL_TOLERANCE,
    RESULT_TIMEOUT,
    PathResult,
    Worker,
    celery_worker,
    check_outputs,
    child_env,
    command_line,
    descendants,
    emit,
    exit_on_sigterm,
    machine,
    open_broker,
    round_trips,
    run_guarded,
    spawned_process_item,
    subprocess_item,
    time_items,
    wait_ready,
    wait_result,
)

PATHS = ("celery_gpu", "plain_celery", "subprocess", "process")
DEVICE_PROCESSES = 2  # celery-gpu device processes, and prefork children
INPUT_POOL = 32  # distinct inputs, cycled through


@dataclass(frozen=True)
class Sizes:
    """How many items each measurement uses."""

    items: int  # throughput batch of a Celery path
    sequential: int  # round trips for the p50 of a Celery path
    naive: int  # items timed one by one in a naive path
    warmup: int  # parallel warm-up items of a Celery path (after every input was seen once)

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        return cls(items=300, sequential=50, naive=3, warmup=50) if quick else cls(2000, 200, 8, 200)


# -- Celery paths ------------------------------------------------------------------------------------------


def run_batch(task: Any, inputs: list[list[float]], count: int, worker: Worker) -> tuple[float, list[float]]:
    """Send ``count`` items with ``.delay`` as fast as possible, wait for all; (seconds, results)."""
    started = time.perf_counter()
    pending = [task.delay(inputs[i % len(inputs)]) for i in range(count)]
    deadline = time.monotonic() + RESULT_TIMEOUT
    values = [float(wait_result(r, worker, deadline)) for r in pending]
    return time.perf_counter() - started, values


def measure_celery(name: str, app_module: ModuleType, worker: Worker, inputs: list[list[float]],
                   sizes: Sizes, started: float) -> PathResult:
    """Readiness, warm-up, throughput and round-trip latency of one running worker."""
    print(f"  waiting for {DEVICE_PROCESSES} processes of {worker.hostname} ...", flush=True)
    wait_ready(app_module, worker, DEVICE_PROCESSES)
    ready_s = time.monotonic() - started
    print(f"  ready after {ready_s:.1f}s; warming up", flush=True)
    _, first = run_batch(app_module.mlp, inputs, len(inputs), worker)  # every input once: the reference
    outputs = dict(enumerate(first))
    _, warm = run_batch(app_module.mlp, inputs, sizes.warmup, worker)
    check_outputs(name, warm, first)
    round_trips(app_module.mlp, inputs, 10)

    elapsed, values = run_batch(app_module.mlp, inputs, sizes.items, worker)
    check_outputs(name, values, first)
    times = round_trips(app_module.mlp, inputs, sizes.sequential)
    return PathResult(
        name, sizes.items / elapsed, 1000 * statistics.median(times),
        f"{sizes.items} items in {elapsed:.2f}s; p50 of {sizes.sequential} round trips",
        outputs=outputs, ready_s=ready_s,
    )


def celery_path(name: str, module_name: str, args: list[str], env: dict[str, str], inputs: list[list[float]],
                sizes: Sizes, log_dir: Path) -> PathResult:
    """Start a worker of ``module_name``, measure it, stop it, and count what it left behind."""
    app_module = importlib.import_module(module_name)
    app_module.app.control.purge()  # leftovers of an interrupted run on a shared broker
    started = time.monotonic()
    with celery_worker(module_name, name.replace("_", "-"), args, env, log_dir) as worker:
        result = measure_celery(name, app_module, worker, inputs, sizes, started)
        print(f"  stopping {worker.hostname}, pid {worker.proc.pid}, and its processes "
              f"{sorted(worker.pids | descendants(worker.proc.pid))}", flush=True)
    result.stop_s, result.left_behind = worker.stop_s, worker.left_behind
    return result


# -- report --------------------------------------------------------------------------------------------------


def outputs_agree(results: dict[str, PathResult]) -> bool:
    reference = next(iter(results.values())).outputs
    return all(
        abs(value - reference[i]) <= REL_TOLERANCE * max(1.0, abs(reference[i]))
        for r in results.values() for i, value in r.outputs.items() if i in reference
    )


def report(results: dict[str, PathResult], sizes: Sizes, broker: str, quick: bool, command: str) -> dict[str, Any]:
    """Print the table and build the JSON summary."""
    print()
    print(f"{'path':<14} {'items/s':>10} {'p50 ms':>10}  notes")
    print("-" * 78)
    for r in results.values():
        extra = f"; ready in {r.ready_s:.1f}s, stopped in {r.stop_s:.1f}s" if r.ready_s and r.stop_s else ""
        print(f"{r.name:<14} {r.items_per_s:>10.2f} {r.p50_ms:>10.2f}  {r.note}{extra}")
    gpu = results.get("celery_gpu")

    def ratio(other: str) -> float | None:
        if gpu is None or other not in results:
            return None
        return round(gpu.items_per_s / results[other].items_per_s, 3)

    summary: dict[str, Any] = {
        "items_per_s": {p: round(results[p].items_per_s, 3) if p in results else None for p in PATHS},
        "p50_ms": {p: round(results[p].p50_ms, 3) if p in results else None for p in PATHS},
        "ratio_vs_plain_celery": ratio("plain_celery"),
        "ratio_vs_subprocess": ratio("subprocess"),
        "ratio_vs_process": ratio("process"),
        "items": sizes.items,
        "sequential_calls": sizes.sequential,
        "naive_items": sizes.naive,
        "ready_s": {p: round(r.ready_s, 2) for p, r in results.items() if r.ready_s is not None},
        "stop_s": {p: round(r.stop_s, 2) for p, r in results.items() if r.stop_s is not None},
        "left_behind": {p: r.left_behind for p, r in results.items() if r.left_behind is not None},
        "outputs_agree": outputs_agree(results),
        "broker": broker,
        "machine": machine(),
        "quick": quick,
        "command": command,
    }
    print()
    for other in ("plain_celery", "subprocess", "process"):
        if summary[f"ratio_vs_{other}"] is not None:
            print(f"celery_gpu throughput / {other}: {summary[f'ratio_vs_{other}']:.2f}x")
    print(f"outputs agree across paths: {summary['outputs_agree']}")
    return summary


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes (300 items, 50 round trips, 3 naive)")
    parser.add_argument("--broker", help="Redis URL to use (default: an embedded Redis started here)")
    parser.add_argument("--out", type=Path, help="also write the final JSON line to this file")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    args = parser.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    return args


def run_paths(url: str, paths: list[str], sizes: Sizes) -> dict[str, PathResult]:
    os.environ["OVERHEAD_BROKER"] = url  # read by the app modules when they are imported below
    inputs = make_inputs(INPUT_POOL)
    results: dict[str, PathResult] = {}
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        log_dir = Path(tmp)
        for name in paths:
            print(f"\n[{name}]", flush=True)
            if name == "celery_gpu":
                env = child_env(url, CELERY_GPU_DEVICES="cpu", CELERY_GPU_PER_DEVICE=str(DEVICE_PROCESSES))
                results[name] = celery_path(name, "benchmarks._overhead_gpu_app", [], env, inputs, sizes, log_dir)
            elif name == "plain_celery":
                args = ["--pool", "prefork", "--concurrency", str(DEVICE_PROCESSES)]
                results[name] = celery_path(name, "benchmarks._overhead_plain_app", args, child_env(url), inputs,
                                            sizes, log_dir)
            elif name == "subprocess":
                results[name] = time_items(name, subprocess_item(child_env(url)), inputs, sizes.naive)
            elif name == "process":
                results[name] = time_items(name, spawned_process_item(), inputs, sizes.naive)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    sizes = Sizes.for_run(args.quick)
    paths = [p for p in PATHS if p in args.paths.split(",")]
    command = command_line("overhead.py", argv)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        url, broker = open_broker(stack, args.broker)
        print(f"broker: {broker}; {os.cpu_count()} CPUs; sizes: {sizes}", flush=True)
        # run_guarded: the failure's frames, and the pending results they hold, are gone before Redis stops.
        code, results = run_guarded(lambda: run_paths(url, paths, sizes))
        if results is None:
            return code
    summary = report(results, sizes, broker, args.quick, command)
    print(f"total time: {time.monotonic() - started:.1f}s")
    emit(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
