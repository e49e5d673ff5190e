"""Running Celery task messages inside a device process: decode a body, trace one task, refuse a bad one, and
the whole ``run`` frame of a plain task.

Shared by single tasks and batches (``batch.py``). Each function returns the plain-data outcome of one task
(:class:`~celery_gpu.wire.protocol.Outcome`) that goes back to the pool in a frame.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from ..errors import MalformedTaskMessage
from ..payload import claims
from ..tasks.submit import brief_array
from ..wire import protocol
from ..wire.body import body_problem
from ..wire.failures import describe_failure
from . import memory
from .context import DeviceContext
from .recovery import protect

__all__ = ["brief_array_reprs", "decode", "refuse", "run_task", "trace"]


def brief_array_reprs() -> None:
    """In this process, Celery's ``saferepr`` shows an array by its shape and dtype (``<ndarray shape=(1, 512)
    dtype=float32>``) wherever it meets one: the return value its tracer formats for every task (the request's
    log line, the ``task-succeeded`` event's ``result``). numpy's own repr of a 1x512 array took 2.6 ms, more
    than all the rest of an item's way through a device process."""
    from celery.utils import saferepr as module

    original = module._repr
    if getattr(original, "celery_gpu_brief", False):
        return

    def brief_repr(obj: Any) -> str:
        brief = brief_array(obj)
        return original(obj) if brief is None else brief

    brief_repr.celery_gpu_brief = True  # type: ignore[attr-defined]
    module._repr = brief_repr


def _accept(ctx: DeviceContext, app: Any) -> Any:
    if ctx.accept is None:
        from kombu.serialization import prepare_accept_content

        ctx.accept = prepare_accept_content(app.conf.accept_content)  # type: ignore[no-untyped-call]
    return ctx.accept


def decode(ctx: DeviceContext, app: Any, name: str, item: protocol.Item) -> tuple[Any, Any, Any, Any]:
    """``(task, args, kwargs, embed)`` of one task message; raises on an unknown task or a bad body (a body that
    is not ``[args, kwargs, embed]``: :class:`MalformedTaskMessage`, whatever the main process saw of it, e.g. only
    a claim-checked body's skeleton)."""
    from kombu.serialization import loads

    task = app.tasks[name]
    body = item["body"]
    if isinstance(body, memoryview) and item["content_encoding"] not in ("binary", "ascii-8bit"):
        body = bytes(body)  # text serializers want bytes; binary ones (arrays, msgpack) decode the view itself
    if item["content_type"] is None and isinstance(body, (list, tuple)):
        decoded = body  # Celery decoded it already (a protocol-1 message, converted by its strategy)
    elif item["content_type"] == protocol.DECODED:  # the main process decoded it (a JSON body): msgpack of it
        decoded = msgpack.unpackb(body, raw=False)
    else:
        decoded = loads(  # type: ignore[no-untyped-call]
            body, item["content_type"], item["content_encoding"], accept=_accept(ctx, app),
        )
    problem = body_problem(decoded)
    if problem is not None:
        raise MalformedTaskMessage(problem)
    args, kwargs, embed = decoded
    return task, args, kwargs, embed


def refuse(app: Any, name: str, item: protocol.Item, cause: Exception) -> protocol.Outcome:
    """A task that cannot even start here (unknown name, undecodable body): store and report a named failure."""
    from billiard.einfo import ExceptionInfo
    from celery.utils.collections import AttributeDict

    why = str(cause) if isinstance(cause, MalformedTaskMessage) else f"{type(cause).__name__}: {cause}"
    # The request as the main process saw it (reply_to, correlation_id: an RPC backend needs them); no chord and
    # no errbacks: the body that names them could not be trusted.
    request = AttributeDict(item["request"], id=item["uuid"], name=name, chord=None, errbacks=None)
    try:
        raise MalformedTaskMessage(f"cannot run task {name}[{item['uuid']}]: {why}")
    except MalformedTaskMessage as exc:
        einfo = ExceptionInfo()
        try:
            app.backend.mark_as_failure(item["uuid"], exc, traceback=einfo.traceback, request=request)
        except Exception:  # the backend is down: the worker still gets the failure, and logs it
            pass
    return protocol.failed_outcome(describe_failure(einfo))


class _ItemClock:
    """``time.monotonic`` for the tracer of a batched task: its first reading after :meth:`back_by` (the tracer's
    start) is moved back by the item's call time, so Celery's own run time of the item (its log line, the
    ``task_success`` signal, the ``task-succeeded`` event) counts the call that computed it."""

    def __init__(self) -> None:
        self._back = 0.0

    def back_by(self, seconds: float) -> None:
        self._back = seconds

    def __call__(self) -> float:
        now, self._back = time.monotonic() - self._back, 0.0
        return now


_clock = _ItemClock()
_tracers: dict[str, Any] = {}  # task name -> the tracer built with the item clock


def _item_tracer(app: Any, task: Any, hostname: str) -> None:
    """Make ``task``'s tracer the one that reads the item clock (once per task)."""
    if task.__trace__ is None or task.__trace__ is not _tracers.get(task.name):
        from celery.app.trace import build_tracer

        task.__trace__ = _tracers[task.name] = build_tracer(task.name, task, app=app, hostname=hostname,
                                                            monotonic=_clock)


def trace(
    ctx: DeviceContext, app: Any, task: Any, item: protocol.Item, args: Any, kwargs: Any, embed: Any, hostname: str,
    took: float | None = None,
) -> protocol.Outcome:
    """Run one decoded task through Celery's own tracer (results, retries, signals, backend writes).

    ``took``: for an item of a batch, the seconds its call took before (counted in its run time). An error raised
    outside Celery's tracer (which catches the task's own) fails the task by name (:func:`refuse`): it never ends
    the process.
    """
    try:
        return _trace(ctx, app, task, item, args, kwargs, embed, hostname, took)
    except Exception as exc:
        return refuse(app, task.name, item, exc)


def _trace(
    ctx: DeviceContext, app: Any, task: Any, item: protocol.Item, args: Any, kwargs: Any, embed: Any, hostname: str,
    took: float | None,
) -> protocol.Outcome:
    from celery.app.trace import trace_task

    if took is not None:
        _item_tracer(app, task, hostname)
        _clock.back_by(took)
    elif getattr(task, "gpu", False) and getattr(task, "gpu_batch", None) is None:
        protect(ctx, task)  # out-of-memory retry and sticky-error exit (batched tasks: per call)
    request: dict[str, Any] = item["request"]
    request.update({"args": args, "kwargs": kwargs, "hostname": hostname, "is_eager": False}, **(embed or {}))
    retval, info, runtime, rstr = trace_task(task, item["uuid"], args, kwargs, request, app=app, hostname=hostname)
    claims.consumed(item["body"])  # the task ended: its out-of-band payload, if any, is no longer needed
    if runtime is None:  # Celery times successes only; a failed item still took its call's time
        runtime = took or 0.0
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
