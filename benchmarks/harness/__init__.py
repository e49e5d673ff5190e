"""What the benchmark scripts share: each of ``overhead.py``, ``batching.py``, ``recovery.py``, ``transfer.py``
and ``peers.py`` imports its common code from here (``from benchmarks.harness import ...``), never from another
script.

- :mod:`~benchmarks.harness.run`: the broker (``open_broker``), the recorded command line, ``machine()``,
  ``source_state()``, the final JSON line (``emit``), exit statuses.
- :mod:`~benchmarks.harness.processes`: a ``celery worker`` subprocess (``celery_worker``, ``Worker``), its
  environment, its log and its loud lines (``LOUD``), the processes below it.
- :mod:`~benchmarks.harness.client`: this process as the worker's client: ``wait_ready``, ``send`` /
  ``collect``, round trips, ``check_outputs``, batching counters, ``started_worker`` (started and warmed up).
- :mod:`~benchmarks.harness.cpu`: CPU time per process, per party of a run, and of the broker.
- :mod:`~benchmarks.harness.naive`: the naive paths (a new interpreter or process per item).
- :mod:`~benchmarks.harness.stats`: percentiles.
"""

from benchmarks.harness.client import (
    COLLECT_INTERVAL,
    READY_TIMEOUT,
    REL_TOLERANCE,
    RESULT_TIMEOUT,
    WorkerInfo,
    batching_stats,
    check_outputs,
    collect,
    round_trips,
    send,
    started_worker,
    wait_ready,
    wait_result,
    warm_up,
)
from benchmarks.harness.cpu import CpuSnapshot, broker_cpu_probe, cpu_per_item, proc_cpu_s, tree_cpu_s
from benchmarks.harness.naive import PathResult, spawned_process_item, subprocess_item, time_items
from benchmarks.harness.processes import (
    LOUD,
    STOP_TIMEOUT,
    Worker,
    alive,
    celery_worker,
    child_env,
    descendants,
    print_loud_lines,
)
from benchmarks.harness.run import (
    REPO,
    command_line,
    emit,
    exit_code,
    exit_on_sigterm,
    machine,
    open_broker,
    redact,
    run_guarded,
    source_after,
    source_state,
    version,
)
from benchmarks.harness.stats import percentile

__all__ = [
    "COLLECT_INTERVAL", "LOUD", "READY_TIMEOUT", "REL_TOLERANCE", "REPO", "RESULT_TIMEOUT", "STOP_TIMEOUT",
    "CpuSnapshot", "PathResult", "Worker", "WorkerInfo",
    "alive", "batching_stats", "broker_cpu_probe", "celery_worker", "check_outputs", "child_env", "collect",
    "command_line", "cpu_per_item", "descendants", "emit", "exit_code", "exit_on_sigterm", "machine",
    "open_broker", "percentile", "print_loud_lines", "proc_cpu_s", "redact", "round_trips", "run_guarded", "send",
    "source_after", "source_state", "spawned_process_item", "started_worker", "subprocess_item", "time_items",
    "tree_cpu_s", "version", "wait_ready", "wait_result", "warm_up",
]
