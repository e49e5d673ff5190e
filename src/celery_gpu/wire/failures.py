"""Task failures across the pipe: described as plain data in the device process, rebuilt in the main process.

Nothing from the device process is imported or unpickled: only Celery's control-flow exceptions (``Retry``,
``Reject``, ``Ignore``) are rebuilt as themselves; every other error becomes a fresh class with the same name
and module, whose ``repr`` is the one the device process saw. The result backend already holds the full failure,
written by Celery's tracer in the device process.

What the main process hands to Celery's request callbacks is what a prefork child's unpickled result is: an
``ExceptionInfo`` whose ``exception`` is the exception itself (billiard's ``ExceptionWithTraceback`` wrapper
unpickles to the exception) and whose ``traceback`` is the child's. So the ``task-failed`` and ``task-retried``
events carry the same ``exception`` (``"ValueError('bad input')"``) and ``traceback`` fields as prefork's.
"""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionInfo
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.saferepr import saferepr
from celery.utils.serialization import create_exception_cls

from .protocol import Failure, FailureFlow, failure

__all__ = ["RemoteError", "describe_failure", "rebuild_einfo", "rebuild_exception", "rebuild_failure"]


class RemoteError(Exception):
    """The base of every error rebuilt from a device process's description: it shows (``repr``) what the device
    process showed, as the exception itself would."""

    shown = ""

    def __repr__(self) -> str:
        return self.shown or super().__repr__()


def _shown(exc: Any) -> str:
    """``exc`` as Celery's task events show it (``safe_repr``)."""
    return str(saferepr(exc))


def describe_failure(einfo: Any) -> Failure:
    """Plain-data form of a traced failure (billiard ``ExceptionInfo``) for the ``done`` frame."""
    exc = getattr(einfo.exception, "exc", einfo.exception)
    kind: FailureFlow = "error"
    shown = exc
    if isinstance(exc, Retry):
        kind, shown = "retry", exc.exc  # Celery's task-retried event shows the reason of the retry
    elif isinstance(exc, Reject):
        kind = "reject"
    elif isinstance(exc, Ignore):
        kind = "ignore"
    return failure(type(exc).__name__, type(exc).__module__, str(exc.reason) if kind == "reject" else str(exc),
                   kind=kind, requeue=bool(getattr(exc, "requeue", False)), traceback=str(einfo.traceback or ""),
                   internal=bool(getattr(einfo, "internal", False)), shown=_shown(shown))


def rebuild_einfo(exc: BaseException, remote_traceback: str | None = None, internal: bool = False) -> ExceptionInfo:
    """A billiard ``ExceptionInfo`` for ``exc`` as Celery's request callbacks get it from a prefork child: its
    ``exception`` is ``exc`` itself, its ``traceback`` the remote one when there is one."""
    try:
        raise exc
    except BaseException:
        einfo = ExceptionInfo(internal=internal)
    einfo.exception = exc
    if remote_traceback:
        einfo.traceback = remote_traceback
    return einfo


def _remote(type_: str, module: str, message: str, shown: str) -> RemoteError:
    exc: RemoteError = create_exception_cls(type_, module, parent=RemoteError)(message)
    exc.shown = shown
    return exc


def rebuild_exception(d: Failure) -> BaseException:
    """The exception a :func:`describe_failure` record stands for (see the module docstring).

    Records from a device process come through :func:`celery_gpu.wire.protocol.read`, which gives every field a
    value; an unknown ``kind`` is an ordinary error.
    """
    kind, message = d["kind"], d["message"]
    exc: BaseException
    if kind == "retry":
        retry = Retry(message)
        if d["repr"]:  # the reason, shown as the device process showed it (Celery would pickle-check it)
            retry.exc = RemoteError()
            retry.exc.shown = retry.excs = d["repr"]
        exc = retry
    elif kind == "reject":
        exc = Reject(message, requeue=d["requeue"])
    elif kind == "ignore":
        exc = Ignore(message)
    else:
        exc = _remote(d["type"], d["module"], message, d["repr"])
    return exc


def rebuild_failure(d: Failure) -> ExceptionInfo:
    """The ``ExceptionInfo`` Celery's request callbacks get for a failure reported by a device process."""
    return rebuild_einfo(rebuild_exception(d), d["traceback"], d["internal"])
