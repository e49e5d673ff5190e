"""Does the CPU device's thread budget pay? Two device processes on the CPU device, with and without it.

Three celery-gpu workers on the CPU device (``benchmarks._threads_app``: a batched MLP, 512 → 2048 → 2048 → 512,
torch's threads left to the pool), started once and measured in turns, so the machine's load is shared alike:

1. ``one_process``: ``--per-gpu 1``, the budget of one process (every core).
2. ``two_processes_every_core``: ``--per-gpu 2`` with ``CELERY_GPU_CPU_THREADS`` = the core count: each process
   runs a thread per core, as before the budget (the baseline).
3. ``two_processes_budget``: ``--per-gpu 2`` with the default budget (the cores divided between the two).

Each turn sends N items with ``submit_many`` and collects every result (end to end, this client included);
reported: the median items/s per worker over the rounds, torch's threads in each device process, and the ratios
``budget_vs_every_core`` and ``budget_vs_one_process``. The last line printed is one JSON object.

Usage::

    python benchmarks/cpu_threads.py [--items 2000] [--rounds 3] [--broker redis://...] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks._overhead_model import make_inputs  # noqa: E402
from benchmarks.harness.client import READY_TIMEOUT, collect, wait_result  # noqa: E402
from benchmarks.harness.processes import Worker, celery_worker, child_env  # noqa: E402
from benchmarks.harness.run import (  # noqa: E402
    command_line,
    emit,
    machine,
    open_broker,
    run_guarded,
    source_after,
    source_state,
)

#: name -> (processes on the CPU device, CELERY_GPU_CPU_THREADS: "" for the default budget, "cores" for every core)
CONFIGS = {"one_process": (1, ""), "two_processes_every_core": (2, "cores"), "two_processes_budget": (2, "")}


def _ready(bench: Any, worker: Worker, queue: str, processes: int) -> None:
    """Every one of the worker's processes has run a task."""
    deadline = time.monotonic() + READY_TIMEOUT
    seen: set[int] = set()
    while len(seen) < processes:
        sent = [bench.whoami.apply_async((0.2,), queue=queue) for _ in range(2 * processes)]
        seen |= {int(wait_result(r, worker, deadline)) for r in sent}


def _measure(items: int, rounds: int, log_dir: Path, broker: str) -> dict[str, Any]:
    os.environ["OVERHEAD_BROKER"] = broker
    from benchmarks import _threads_app as bench

    cores = os.cpu_count() or 1
    inputs = make_inputs(items)
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    threads: dict[str, list[int]] = {}
    with contextlib.ExitStack() as stack:
        workers = {}
        for name, (per_device, budget) in CONFIGS.items():
            env = child_env(broker, CELERY_GPU_DEVICES="cpu", CELERY_GPU_PER_DEVICE=str(per_device))
            env.pop("CELERY_GPU_CPU_THREADS", None)
            env.pop("OMP_NUM_THREADS", None)
            if budget == "cores":
                env["CELERY_GPU_CPU_THREADS"] = str(cores)
            workers[name] = stack.enter_context(celery_worker("benchmarks._threads_app", f"threads-{name}",
                                                              ["-Q", f"threads-{name}"], env, log_dir))
        for name, worker in workers.items():
            _ready(bench, worker, f"threads-{name}", CONFIGS[name][0])
            seen = [bench.threads.apply_async(queue=f"threads-{name}").get(timeout=60) for _ in range(8)]
            threads[name] = sorted({s["torch"] for s in seen})
            collect(bench.mlp_batch.submit_many(inputs[:200], queue=f"threads-{name}"), worker)  # warm up
        for r in range(rounds):
            for name, worker in workers.items():
                started = time.perf_counter()
                collect(bench.mlp_batch.submit_many(inputs, queue=f"threads-{name}"), worker)
                rates[name].append(items / (time.perf_counter() - started))
                print(f"  round {r + 1}: {name}: {rates[name][-1]:.1f} items/s", flush=True)
    median = {name: round(statistics.median(values), 1) for name, values in rates.items()}
    return {
        "items_per_s": median, "rounds": rates, "torch_threads": threads,
        "budget_vs_every_core": round(median["two_processes_budget"] / median["two_processes_every_core"], 2),
        "budget_vs_one_process": round(median["two_processes_budget"] / median["one_process"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--broker", help="Redis URL (default: an embedded Redis)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    before = source_state()
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as logs:
        url, shown = open_broker(stack, args.broker)
        code, measured = run_guarded(lambda: _measure(args.items, args.rounds, Path(logs), url))
    if measured is None:
        return code
    emit({"benchmark": "cpu_threads", "command": command_line("cpu_threads.py", argv), "broker": shown,
          "items": args.items, "machine": machine(), "load_before": load_before, "load_after": os.getloadavg(),
          "source": source_after(before), **measured}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
