"""The pool's state for operators, through Celery's own channels.

* ``celery -A proj inspect gpu`` (remote control): per worker, the full status snapshot — devices with their
  live readings, processes, counters, batching, histograms.
* a ``worker-gpu`` event after every worker heartbeat: the same summary without histograms, so monitors that
  already follow Celery's events (Flower, custom consumers) see the GPUs. Heartbeat events are sent whether or
  not task events (``-E``) are on.

``GPU(app)`` registers both (:func:`register_command`), in every process of the app: Celery's ``celery inspect``
command line only sends commands it knows in its own process. The pool of a worker makes itself the source of
both with :func:`register_source` when it starts.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from celery import signals

from .snapshot import Status, StatusSource, Summary

__all__ = ["gpu", "register_command", "register_source", "summary", "unregister_source"]

logger = logging.getLogger("celery_gpu.control")

_source: StatusSource | None = None  # the pool of this worker process, once started
_registered = False


def register_command() -> None:
    """Register ``celery inspect gpu`` and the ``worker-gpu`` event after each heartbeat (once per process)."""
    global _registered
    if _registered:
        return
    from celery.worker.control import inspect_command

    inspect_command(name="gpu")(gpu)
    signals.heartbeat_sent.connect(_after_heartbeat, weak=False)
    _registered = True


def register_source(source: StatusSource) -> None:
    """Make ``source`` the one ``inspect gpu`` answers with and whose summary follows the worker's heartbeats."""
    global _source
    _source = source


def unregister_source(source: StatusSource) -> None:
    """Forget ``source`` (the pool stopped), unless another took its place meanwhile."""
    global _source
    if _source is source:
        _source = None


def gpu(state: Any, **kwargs: Any) -> Status | dict[str, str]:
    """Devices, live readings, device processes, counters, batching and histograms of this worker's pool."""
    if _source is None:
        return {"error": "this worker does not run the celery-gpu pool"}
    return _source.status()


def summary(status: Status) -> Summary:
    """The status without histograms (small enough for an event after every heartbeat)."""
    return cast(Summary, {k: v for k, v in status.items() if k != "histograms"})  # whatever else Status holds


def _after_heartbeat(sender: Any = None, **_: Any) -> None:
    if _source is None:
        return
    eventer = getattr(sender, "eventer", None)
    if eventer is None or not getattr(eventer, "enabled", False):
        return
    try:
        eventer.send("worker-gpu", gpu=summary(_source.status()))
    except Exception:  # monitoring must never disturb the worker
        logger.debug("celery-gpu: could not send the worker-gpu event", exc_info=True)
