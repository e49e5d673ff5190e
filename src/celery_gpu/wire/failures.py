"""Task failures across the pipe: described as plain data in the device process, rebuilt in the main process.

Nothing from the device process is imported or unpickled: only Celery's control-flow exceptions (``Retry``,
``Reject``, ``Ignore``) are rebuilt as themselves; every other error becomes a fresh class with the same name
and module. The result backend already holds the full failure, written by Celery's tracer in the device process.
"""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.serialization import create_exception_cls

from .protocol import Failure, FailureFlow, failure

__all__ = ["describe_failure", "rebuild_einfo", "rebuild_exception", "rebuild_failure"]


def describe_failure(einfo: Any) -> Failure:
    """Plain-data form of a traced failure (billiard ``ExceptionInfo``) for the ``done`` frame."""
    exc = getattr(einfo.exception, "exc", einfo.exception)
    kind: FailureFlow = "error"
    if isinstance(exc, Retry):
        kind = "retry"
    elif isinstance(exc, Reject):
        kind = "reject"
    elif isinstance(exc, Ignore):
        kind = "ignore"
    return failure(type(exc).__name__, type(exc).__module__, str(exc.reason) if kind == "reject" else str(exc),
                   kind=kind, requeue=bool(getattr(exc, "requeue", False)), traceback=str(einfo.traceback or ""),
                   internal=bool(getattr(einfo, "internal", False)))


def rebuild_einfo(exc: BaseException, remote_traceback: str | None = None, internal: bool = False) -> ExceptionInfo:
    """A billiard ``ExceptionInfo`` for ``exc`` as Celery's request callbacks expect it."""
    try:
        raise exc
    except BaseException:
        einfo = ExceptionInfo(internal=internal)
    if remote_traceback:
        einfo.traceback = remote_traceback
        einfo.exception = ExceptionWithTraceback(exc, remote_traceback)
    return einfo


def rebuild_exception(d: Failure) -> BaseException:
    """The exception a :func:`describe_failure` record stands for (see the module docstring).

    Records from a device process come through :func:`celery_gpu.wire.protocol.read`, which gives every field a
    value; an unknown ``kind`` is an ordinary error.
    """
    kind, message = d["kind"], d["message"]
    exc: BaseException
    if kind == "retry":
        exc = Retry(message)
    elif kind == "reject":
        exc = Reject(message, requeue=d["requeue"])
    elif kind == "ignore":
        exc = Ignore(message)
    else:
        exc = create_exception_cls(d["type"], d["module"])(message)
    return exc


def rebuild_failure(d: Failure) -> ExceptionInfo:
    """The ``ExceptionInfo`` Celery's request callbacks get for a failure reported by a device process."""
    return rebuild_einfo(rebuild_exception(d), d["traceback"], d["internal"])
