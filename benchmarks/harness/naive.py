"""The naive paths: a fresh interpreter, or a spawned ``multiprocessing.Process``, per item, each importing torch,
building the model and running one input; every item timed alone."""

from __future__ import annotations

import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks._overhead_model import SUBPROCESS_CODE, process_item
from benchmarks.harness.run import REPO


@dataclass
class PathResult:
    """The figures of one path of ``overhead.py`` (and of a naive path wherever it runs)."""

    name: str
    items_per_s: float
    p50_ms: float
    note: str
    outputs: dict[int, float] = field(default_factory=dict)  # input index -> result, to check the paths agree
    ready_s: float | None = None  # Celery paths: worker start until every process answered
    stop_s: float | None = None  # Celery paths: SIGTERM until the worker exited
    left_behind: int | None = None  # Celery paths: processes still alive after the worker stopped


def time_items(name: str, run_one: Callable[[list[float]], float], inputs: list[list[float]],
               count: int) -> PathResult:
    """Time ``run_one`` on ``count`` items, one after another."""
    times: list[float] = []
    outputs: dict[int, float] = {}
    for i in range(count):
        started = time.perf_counter()
        outputs[i] = run_one(inputs[i % len(inputs)])
        times.append(time.perf_counter() - started)
        print(f"  item {i + 1}/{count}: {times[-1]:.2f}s", flush=True)
    mean = statistics.fmean(times)
    return PathResult(name, 1 / mean, 1000 * statistics.median(times),
                      f"{count} items, {mean:.2f}s each on average", outputs=outputs)


def subprocess_item(env: dict[str, str]) -> Callable[[list[float]], float]:
    """One item in a new interpreter (``python -c``), with environment ``env``."""

    def run_one(x: list[float]) -> float:
        done = subprocess.run([sys.executable, "-c", SUBPROCESS_CODE], input=json.dumps(x), capture_output=True,
                              text=True, check=True, cwd=REPO, env=env)
        return float(json.loads(done.stdout))

    return run_one


def spawned_process_item() -> Callable[[list[float]], float]:
    """One item in a spawned ``multiprocessing.Process``, its result back through a pipe."""
    ctx = multiprocessing.get_context("spawn")

    def run_one(x: list[float]) -> float:
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=process_item, args=(x, sender))
        proc.start()
        sender.close()
        try:
            value = float(receiver.recv())
        finally:
            receiver.close()
            proc.join()
        return value

    return run_one
