"""Prefetch for batches: a consumer bootstep that lets the worker hold enough messages to fill batches.

Celery caps unacknowledged messages at ``concurrency × worker_prefetch_multiplier``: with one message per
device process, batches could never grow past a handful of items. For each batched task the worker may hold
two full batches per device process (one running, one filling) on top of Celery's own prefetch; no more,
so a worker that dies loses (returns to the broker) a bounded amount of work.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from ...tasks.batched import BatchOptions

__all__ = ["BatchPrefetch", "batch_prefetch"]


def batch_prefetch(app: Any, processes: int) -> int:
    """Extra messages to prefetch: two batches of the largest batched task per device process."""
    sizes = [t.gpu_batch.size for t in app.tasks.values() if isinstance(getattr(t, "gpu_batch", None), BatchOptions)]
    return 2 * processes * max(sizes) if sizes else 0


class BatchPrefetch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Raises the consumer's prefetch count once the task consumer has started (again after reconnects)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "celery-gpu batch prefetch"

    def start(self, c: Any) -> None:
        processes = int(getattr(getattr(c, "pool", None), "num_processes", 0) or 0)
        if c.qos is None or not processes or not c.initial_prefetch_count:
            return  # prefetch disabled (worker_prefetch_multiplier=0): leave it unlimited
        extra = batch_prefetch(c.app, processes)
        if extra:
            c.qos.increment_eventually(extra)
            c.qos.update()
