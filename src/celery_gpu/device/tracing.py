"""Running Celery task messages inside a device process: decode a body, trace one task, refuse a bad one, and
the whole ``run`` frame of a plain task.

Shared by single tasks and batches (``batch.py``). Each function returns the plain-data outcome of one task
(:class:`~celery_gpu.wire.protocol.Outcome`) that goes back to the pool in a frame.
"""

from __future__ import annotations

from typing import Any

from ..payload import claims
from ..wire import protocol
from ..wire.failures import describe_failure
from . import memory
from .context import DeviceContext
from .recovery import protect

__all__ = ["decode", "refuse", "run_task", "trace"]


def _accept(ctx: DeviceContext, app: Any) -> Any:
    if ctx.accept is None:
        from kombu.serialization import prepare_accept_content

        ctx.accept = prepare_accept_content(app.conf.accept_content)  # type: ignore[no-untyped-call]
    return ctx.accept


def decode(ctx: DeviceContext, app: Any, name: str, item: protocol.Item) -> tuple[Any, Any, Any, Any]:
    """``(task, args, kwargs, embed)`` of one task message; raises on an unknown task or a bad body."""
    from kombu.serialization import loads

    task = app.tasks[name]
    body = item["body"]
    if isinstance(body, memoryview) and item["content_encoding"] not in ("binary", "ascii-8bit"):
        body = bytes(body)  # text serializers want bytes; binary ones (arrays, msgpack) decode the view itself
    args, kwargs, embed = loads(  # type: ignore[no-untyped-call]
        body, item["content_type"], item["content_encoding"], accept=_accept(ctx, app),
    )
    return task, args, kwargs, embed


def refuse(app: Any, name: str, item: protocol.Item, cause: Exception) -> protocol.Outcome:
    """A task that cannot even start here (unknown name, undecodable body): store and report a named failure."""
    from billiard.einfo import ExceptionInfo

    from ..errors import MalformedTaskMessage

    try:
        raise MalformedTaskMessage(f"cannot run task {name}[{item['uuid']}]: {type(cause).__name__}: {cause}")
    except MalformedTaskMessage as exc:
        einfo = ExceptionInfo()
        try:
            app.backend.mark_as_failure(item["uuid"], exc, traceback=einfo.traceback)
        except Exception:  # the backend is down: the worker still gets the failure, and logs it
            pass
    return protocol.failed_outcome(describe_failure(einfo))


def trace(
    ctx: DeviceContext, app: Any, task: Any, item: protocol.Item, args: Any, kwargs: Any, embed: Any, hostname: str,
) -> protocol.Outcome:
    """Run one decoded task through Celery's own tracer (results, retries, signals, backend writes)."""
    from celery.app.trace import trace_task

    if getattr(task, "gpu", False) and getattr(task, "gpu_batch", None) is None:
        protect(ctx, task)  # out-of-memory retry and sticky-error exit (batched tasks: per call)
    request: dict[str, Any] = item["request"]
    request.update({"args": args, "kwargs": kwargs, "hostname": hostname, "is_eager": False}, **(embed or {}))
    retval, info, runtime, rstr = trace_task(task, item["uuid"], args, kwargs, request, app=app, hostname=hostname)
    claims.consumed(item["body"])  # the task ended: its out-of-band payload, if any, is no longer needed
    if info:
        return protocol.failed_outcome(describe_failure(retval), runtime)
    return {"failed": False, "retval": rstr, "runtime": runtime}


def run_task(ctx: DeviceContext, app: Any, frame: protocol.RunFrame, hostname: str) -> protocol.DoneFrame:
    """Run one ``run`` frame through Celery's tracer; the ``done`` frame (``mem`` is the caller's to fill)."""
    ctx.in_task = True
    memory.start_peak(ctx)
    if ctx.models is not None:
        ctx.models.budget = frame.get("budget")  # the task's model is loaded inside its call (protect)
    try:
        try:
            task, args, kwargs, embed = decode(ctx, app, frame["name"], frame)
        except Exception as exc:  # fails the task by name, never the process
            outcome = refuse(app, frame["name"], frame, exc)
        else:
            outcome = trace(ctx, app, task, frame, args, kwargs, embed, hostname)
    finally:
        ctx.in_task = False
        ctx.item_cost = None
    splits, _ = ctx.take_oom_stats()
    return protocol.done(frame["job"], outcome, 0, memory.peak(ctx), splits, ctx.take_cost())
