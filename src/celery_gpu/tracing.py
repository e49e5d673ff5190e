"""Running Celery task messages inside a device process: decode a body, trace one task, refuse a bad one.

Shared by single tasks (``child.py``) and batches (``batchrun.py``). Each function returns the plain-data
outcome of one task (``{"failed", "retval" | "exc", "runtime"}``) that goes back to the pool in a frame.
"""

from __future__ import annotations

from typing import Any

from . import claimcheck, guard
from .failures import describe_failure

__all__ = ["decode", "refuse", "trace", "in_task", "set_in_task"]

_in_task = False
_accept_cache: dict[int, Any] = {}


def in_task() -> bool:
    """Whether a task (or batch) is running now; a soft time limit only interrupts one then."""
    return _in_task


def set_in_task(value: bool) -> None:
    """Mark the start or the end of task code."""
    global _in_task
    _in_task = value


def _accept(app: Any) -> Any:
    from kombu.serialization import prepare_accept_content

    if id(app) not in _accept_cache:
        _accept_cache[id(app)] = prepare_accept_content(app.conf.accept_content)  # type: ignore[no-untyped-call]
    return _accept_cache[id(app)]


def decode(app: Any, msg: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``(task, args, kwargs, embed)`` of a ``run`` frame or batch item; raises on an unknown task or bad body."""
    from kombu.serialization import loads

    task = app.tasks[msg["name"]]
    body = msg["body"]
    if isinstance(body, memoryview) and msg["content_encoding"] not in ("binary", "ascii-8bit"):
        body = bytes(body)  # text serializers want bytes; binary ones (arrays, msgpack) decode the view itself
    args, kwargs, embed = loads(  # type: ignore[no-untyped-call]
        body, msg["content_type"], msg["content_encoding"], accept=_accept(app),
    )
    return task, args, kwargs, embed


def refuse(app: Any, msg: dict[str, Any], cause: Exception) -> dict[str, Any]:
    """A task that cannot even start here (unknown name, undecodable body): store and report a named failure."""
    from billiard.einfo import ExceptionInfo

    from .errors import MalformedTaskMessage

    try:
        raise MalformedTaskMessage(f"cannot run task {msg['name']}[{msg['uuid']}]: {type(cause).__name__}: {cause}")
    except MalformedTaskMessage as exc:
        einfo = ExceptionInfo()
        try:
            app.backend.mark_as_failure(msg["uuid"], exc, traceback=einfo.traceback)
        except Exception:  # the backend is down: the worker still gets the failure, and logs it
            pass
    return {"failed": True, "exc": describe_failure(einfo), "runtime": 0.0}


def trace(
    app: Any, task: Any, msg: dict[str, Any], args: Any, kwargs: Any, embed: Any, hostname: str,
) -> dict[str, Any]:
    """Run one decoded task through Celery's own tracer (results, retries, signals, backend writes)."""
    from celery.app.trace import trace_task

    if getattr(task, "gpu", False) and getattr(task, "gpu_batch", None) is None:
        guard.guard_run(task)  # out-of-memory retry and sticky-error exit (batched tasks: per call)
    request: dict[str, Any] = msg["request"]
    request.update({"args": args, "kwargs": kwargs, "hostname": hostname, "is_eager": False}, **(embed or {}))
    retval, info, runtime, rstr = trace_task(task, msg["uuid"], args, kwargs, request, app=app, hostname=hostname)
    claimcheck.consumed(msg["body"])  # the task ended: its out-of-band payload, if any, is no longer needed
    if info:
        return {"failed": True, "exc": describe_failure(retval), "runtime": runtime}
    return {"failed": False, "retval": rstr, "runtime": runtime}
