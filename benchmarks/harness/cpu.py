"""CPU time used by each party of a run: processes (from ``/proc``), this client (``os.times``) and the broker
(Redis's ``INFO cpu``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness.processes import Worker, descendants

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one live process, from ``/proc/<pid>/stat`` (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... utime(11) stime(12)
    return (int(fields[11]) + int(fields[12])) * TICK_S


def tree_cpu_s(pids: set[int]) -> float:
    """CPU seconds of every process of ``pids`` together."""
    return sum(proc_cpu_s(pid) for pid in pids)


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used so far by each party of a run."""

    client: float  # this process (every thread)
    worker_main: float | None = None  # the ``celery worker`` process: consumer, acks, the pool's dispatch
    worker_children: dict[int, float] = field(default_factory=dict)  # device processes / prefork children
    broker: float | None = None  # the Redis server (``INFO cpu``); shared with anything else using it

    @classmethod
    def take(cls, worker: Worker | None, broker_cpu: Callable[[], float | None]) -> CpuSnapshot:
        times = os.times()
        if worker is None:
            return cls(times.user + times.system, broker=broker_cpu())
        children = {pid: proc_cpu_s(pid) for pid in descendants(worker.proc.pid)}
        return cls(times.user + times.system, proc_cpu_s(worker.proc.pid), children, broker_cpu())


def cpu_per_item(before: CpuSnapshot, after: CpuSnapshot, items: int) -> dict[str, float | None]:
    """Milliseconds of CPU per item between two snapshots, per party and in total."""

    def ms(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(1000 * max(0.0, b - a) / items, 4)

    out: dict[str, float | None] = {"client": ms(before.client, after.client)}
    if after.worker_main is not None:
        children = sum(cpu - before.worker_children.get(pid, 0.0) for pid, cpu in after.worker_children.items())
        out["worker_main"] = ms(before.worker_main, after.worker_main)
        out["worker_children"] = ms(0.0, children)
    out["broker"] = ms(before.broker, after.broker)
    out["total"] = round(sum(v for v in out.values() if v is not None), 4)
    return out


def broker_cpu_probe(app: Any) -> Callable[[], float | None]:
    """A function returning the broker's CPU seconds (``INFO cpu`` of the result backend's Redis), or None."""

    def probe() -> float | None:
        try:
            info = app.backend.client.info("cpu")
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        except Exception:  # not Redis, or no INFO: the broker's share is left out
            return None

    return probe
