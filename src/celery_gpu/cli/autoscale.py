"""How many workers a cluster wants now, from the autoscaling signals of its workers' status snapshots.

The rule (docs/operations.md, "Autoscaling"), what ``celery-gpu status --autoscale N`` prints and what a
script or cron job can act on where there is no KEDA:

* demand = the broker backlog of the workers' queues (each queue counted once: the largest count any worker
  sampled) + the items waiting in the workers' pools;
* desired = ceil(demand ÷ ``per_worker``), the number of workers that keeps each below ``per_worker`` waiting
  items (KEDA's ``AverageValue`` target does the same with a Prometheus query);
* never fewer than now while the devices are saturated: a batched task's batches were at least
  :data:`SATURATED` full over the last minute on some worker;
* then clamped to ``[minimum, maximum]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypedDict

__all__ = ["SATURATED", "Advice", "recommend"]

#: Batch fill (items ÷ batch over the last minute) at or above which a worker's devices count as saturated.
SATURATED = 0.9


class Advice(TypedDict):
    """A recommendation: the workers answering now, the workers wanted, and the figures behind it."""

    current: int
    desired: int
    backlog: int  # messages waiting in the broker (queues counted once)
    waiting: int  # items waiting in the pools
    batch_fill: float | None  # the highest recent batch fill of any batched task on any worker
    reason: str


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _scaling(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    scaling = snapshot.get("scaling")
    return scaling if isinstance(scaling, dict) else {}


def _gather(snapshots: Mapping[str, Mapping[str, Any]]) -> tuple[int, int, float | None]:
    """``(broker backlog with each queue counted once, items waiting in pools, highest batch fill)``."""
    backlog: dict[str, int] = {}
    waiting = 0
    fills: list[float] = []
    for snapshot in snapshots.values():
        scaling = _scaling(snapshot)
        for queue, count in (scaling.get("queues") or {}).items():
            if _num(count) is not None:
                backlog[queue] = max(backlog.get(queue, 0), int(count))
        for signals in (scaling.get("tasks") or {}).values():
            if isinstance(signals, dict):
                waiting += int(_num(signals.get("waiting")) or 0)
                fill = _num(signals.get("batch_fill"))
                if fill is not None:
                    fills.append(fill)
    return sum(backlog.values()), waiting, max(fills) if fills else None


def recommend(snapshots: Mapping[str, Mapping[str, Any]], per_worker: int, minimum: int = 1,
              maximum: int = 1_000_000) -> Advice:
    """The workers wanted for ``snapshots`` (nodename → status, as ``celery-gpu status --json`` gives them)."""
    if per_worker < 1 or minimum < 0 or maximum < max(minimum, 1):
        raise ValueError(f"need per_worker >= 1 and 0 <= minimum <= maximum (got {per_worker}, {minimum}, {maximum})")
    backlog, waiting, fill = _gather(snapshots)
    current = len(snapshots)
    desired = math.ceil((backlog + waiting) / per_worker)
    reason = f"{backlog + waiting} items waiting ({backlog} in the broker, {waiting} in pools), {per_worker} per worker"
    if fill is not None and fill >= SATURATED and desired < current:
        desired, reason = current, f"{reason}; held at {current}: batches {fill:.0%} full (saturated)"
    clamped = min(max(desired, minimum), maximum)
    if clamped != desired:
        reason = f"{reason}; clamped to [{minimum}, {maximum}]"
    return {"current": current, "desired": clamped, "backlog": backlog, "waiting": waiting, "batch_fill": fill,
            "reason": reason}
