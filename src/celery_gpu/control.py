"""The pool's state for operators, through Celery's own channels.

* ``celery -A proj inspect gpu`` (remote control): per worker, the full :meth:`GPUPool.status` — devices with
  their live readings, processes, counters, batching, histograms.
* a ``worker-gpu`` event after every worker heartbeat: the same summary without histograms, so monitors that
  already follow Celery's events (Flower, custom consumers) see the GPUs. Heartbeat events are sent whether or
  not task events (``-E``) are on.

Importing this module registers both (``GPU(app)`` does).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.worker.control import inspect_command

__all__ = ["gpu", "summary"]

logger = logging.getLogger("celery_gpu.control")


def _pool_of(state: Any) -> Any:
    from .pool import GPUPool

    pool = getattr(getattr(state, "consumer", None), "pool", None)
    return pool if isinstance(pool, GPUPool) else None


@inspect_command()  # type: ignore[untyped-decorator]
def gpu(state: Any, **kwargs: Any) -> dict[str, Any]:
    """Devices, live readings, device processes, counters, batching and histograms of this worker's pool."""
    pool = _pool_of(state)
    if pool is None:
        return {"error": "this worker does not run the celery-gpu pool"}
    result: dict[str, Any] = pool.status()
    return result


def summary(status: dict[str, Any]) -> dict[str, Any]:
    """The status without histograms (small enough for an event after every heartbeat)."""
    return {k: v for k, v in status.items() if k != "histograms"}


_current: list[Any] = []  # the pool of this worker process, once started (set by GPUPool.on_start)


def register_pool(pool: Any) -> None:
    """Make ``pool`` the one whose summary follows the worker's heartbeats."""
    _current[:] = [pool]


def unregister_pool(pool: Any) -> None:
    if _current and _current[0] is pool:
        _current.clear()


@signals.heartbeat_sent.connect(weak=False)  # type: ignore[untyped-decorator]
def _after_heartbeat(sender: Any = None, **_: Any) -> None:
    if not _current:
        return
    eventer = getattr(sender, "eventer", None)
    if eventer is None or not getattr(eventer, "enabled", False):
        return
    try:
        eventer.send("worker-gpu", gpu=summary(_current[0].status()))
    except Exception:  # monitoring must never disturb the worker
        logger.debug("celery-gpu: could not send the worker-gpu event", exc_info=True)
