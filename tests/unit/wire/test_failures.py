"""How task failures cross the pipe: described in the device process, rebuilt (never imported) in the worker."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from celery.exceptions import Ignore, Reject, Retry

from celery_gpu.wire.failures import describe_failure
from celery_gpu.wire.failures import rebuild_einfo as _einfo
from celery_gpu.wire.failures import rebuild_exception as _remote_exception
from celery_gpu.wire.frames import Channel


def _failure(**overrides: Any) -> dict[str, Any]:
    d = {"kind": "error", "type": "ValueError", "module": "builtins", "message": "boom", "requeue": False,
         "traceback": "", "internal": False, "repr": ""}
    d.update(overrides)
    return d


def _raised(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


# -- _remote_exception ----------------------------------------------------------------------------------


def test_retry_is_rebuilt_as_celery_retry() -> None:
    exc = _remote_exception(_failure(kind="retry", type="Retry", module="celery.exceptions", message="later"))
    assert type(exc) is Retry
    assert str(exc) == "later"


@pytest.mark.parametrize("requeue", [True, False])
def test_reject_is_rebuilt_with_its_requeue_flag(requeue: bool) -> None:
    exc = _remote_exception(_failure(kind="reject", type="Reject", module="celery.exceptions", message="no",
                                     requeue=requeue))
    assert isinstance(exc, Reject)
    assert exc.requeue is requeue


def test_ignore_is_rebuilt_as_celery_ignore() -> None:
    exc = _remote_exception(_failure(kind="ignore", type="Ignore", module="celery.exceptions", message="skip"))
    assert type(exc) is Ignore
    assert str(exc) == "skip"


def test_other_errors_keep_name_module_and_message() -> None:
    exc = _remote_exception(_failure(type="ShapeMismatch", module="myproj.models", message="3 != 4"))
    assert type(exc).__name__ == "ShapeMismatch"
    assert type(exc).__module__ == "myproj.models"
    assert str(exc) == "3 != 4"
    assert isinstance(exc, Exception)


@pytest.mark.parametrize(
    ("name", "real"),
    [("MemoryError", MemoryError), ("ValueError", ValueError), ("SystemExit", SystemExit),
     ("KeyboardInterrupt", KeyboardInterrupt), ("TimeoutError", TimeoutError), ("OSError", OSError)],
)
def test_builtin_names_are_not_the_builtin_classes(name: str, real: type[BaseException]) -> None:
    # A task's MemoryError must not look like the worker's own MemoryError (or SystemExit, ...).
    exc = _remote_exception(_failure(type=name, module="builtins", message="from the task"))
    assert type(exc).__name__ == name
    assert type(exc).__module__ == "builtins"
    assert type(exc) is not real
    assert not isinstance(exc, real)
    assert str(exc) == "from the task"


@pytest.mark.parametrize("kind", ["error", "unknown-kind"])
def test_celery_names_with_error_kind_are_not_celery_classes(kind: str) -> None:
    # Only the kind decides control flow; a type named Retry from a plain error is just a look-alike.
    exc = _remote_exception(_failure(kind=kind, type="Retry", module="celery.exceptions", message="x"))
    assert not isinstance(exc, (Retry, Reject, Ignore))
    assert type(exc).__name__ == "Retry"


def test_remote_module_is_never_imported() -> None:
    import sys

    exc = _remote_exception(_failure(type="Evil", module="celery_gpu_unit_no_such_module", message="x"))
    assert type(exc).__module__ == "celery_gpu_unit_no_such_module"
    assert "celery_gpu_unit_no_such_module" not in sys.modules


# -- _einfo ---------------------------------------------------------------------------------------------

REMOTE_TB = (
    "Traceback (most recent call last):\n"
    '  File "/srv/proj/tasks.py", line 12, in infer\n'
    "    raise ValueError('bad shape')\n"
    "ValueError: bad shape\n"
)


def test_einfo_keeps_the_remote_traceback() -> None:
    exc = _remote_exception(_failure(message="bad shape"))
    einfo = _einfo(exc, REMOTE_TB)
    assert isinstance(einfo, ExceptionInfo)
    assert einfo.traceback == REMOTE_TB
    assert str(einfo) == REMOTE_TB
    assert einfo.type is type(exc)
    assert einfo.exception is exc  # as a prefork child's result unpickles: the exception, not billiard's wrapper
    assert einfo.internal is False


def test_einfo_without_remote_traceback_is_local() -> None:
    exc = RuntimeError("lost")
    einfo = _einfo(exc)
    assert einfo.type is RuntimeError
    assert einfo.exception is exc
    assert "RuntimeError: lost" in einfo.traceback
    assert "Traceback" in einfo.traceback


def test_einfo_internal_flag() -> None:
    assert _einfo(ValueError("x"), REMOTE_TB, internal=True).internal is True
    assert _einfo(ValueError("x"), None, internal=True).internal is True


# -- describe_failure -----------------------------------------------------------------------------------


def test_describe_a_value_error() -> None:
    d = describe_failure(_raised(ValueError("bad input")))
    assert d["kind"] == "error"
    assert d["type"] == "ValueError"
    assert d["module"] == "builtins"
    assert d["message"] == "bad input"
    assert d["requeue"] is False
    assert d["internal"] is False
    assert isinstance(d["traceback"], str)
    assert d["traceback"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad input" in d["traceback"]
    assert "_raised" in d["traceback"]


def test_describe_a_custom_error() -> None:
    class ShapeMismatch(Exception):
        pass

    d = describe_failure(_raised(ShapeMismatch("3 != 4")))
    assert (d["kind"], d["type"], d["module"], d["message"]) == ("error", "ShapeMismatch", __name__, "3 != 4")


def test_describe_an_unwrapped_exception_info() -> None:
    # an einfo-like object whose exception is the exception itself (not billiard's wrapper)
    class Plain:
        exception = KeyError("k")
        traceback = None

    d = describe_failure(Plain())
    assert (d["kind"], d["type"], d["message"], d["traceback"]) == ("error", "KeyError", "'k'", "")


def test_describe_retry() -> None:
    d = describe_failure(_raised(Retry("later", exc=ValueError("flaky"))))
    assert d["kind"] == "retry"
    assert d["type"] == "Retry"
    assert d["message"] == "later"


def test_describe_reject_and_ignore() -> None:
    d = describe_failure(_raised(Reject("no", requeue=True)))
    assert (d["kind"], d["requeue"]) == ("reject", True)
    assert describe_failure(_raised(Reject("no", requeue=False)))["requeue"] is False
    assert describe_failure(_raised(Ignore("skip")))["kind"] == "ignore"


def test_reject_reason_survives_the_pipe() -> None:
    rebuilt = _remote_exception(describe_failure(_raised(Reject("no", requeue=True))))
    assert isinstance(rebuilt, Reject)
    assert rebuilt.reason == "no"


def test_described_failure_crosses_the_pipe_and_is_rebuilt() -> None:
    # the whole path: device process describes, frame carries it, worker rebuilds a look-alike with the traceback
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    try:
        left.write({"t": "done", "job": 1, "failed": True, "exc": describe_failure(_raised(MemoryError("oom")))})
        failure = right.read()["exc"]
    finally:
        left.close()
        right.close()
    exc = _remote_exception(failure)
    einfo = _einfo(exc, failure["traceback"], failure["internal"])
    assert type(exc).__name__ == "MemoryError"
    assert not isinstance(exc, MemoryError)
    assert str(exc) == "oom"
    assert "MemoryError: oom" in einfo.traceback
    assert "_raised" in einfo.traceback


@pytest.mark.parametrize(("exc", "cls"), [(Retry("later"), Retry), (Reject("r", requeue=True), Reject),
                                          (Ignore("i"), Ignore)])
def test_control_flow_exceptions_round_trip(exc: BaseException, cls: type[BaseException]) -> None:
    rebuilt = _remote_exception(describe_failure(_raised(exc)))
    assert type(rebuilt) is cls
    if isinstance(rebuilt, Reject):
        assert rebuilt.requeue is True


# -- what Celery's task events show (issue 16) -------------------------------------------------------------


@pytest.mark.parametrize("exc", [ValueError("Unsupported input type: int"), KeyError("gpu"), OSError(2, "gone")])
def test_a_rebuilt_error_shows_the_repr_the_device_process_saw(exc: BaseException) -> None:
    d = describe_failure(_raised(exc))
    assert d["repr"] == repr(exc)
    rebuilt = _remote_exception(d)
    assert repr(rebuilt) == repr(exc)  # Celery's task-failed event: safe_repr(exception)
    assert type(rebuilt).__name__ == type(exc).__name__


def test_a_rebuilt_retry_shows_its_reason_as_prefork_does() -> None:
    rebuilt = _remote_exception(describe_failure(_raised(Retry("Retry in 1s", exc=ValueError("flaky")))))
    assert type(rebuilt) is Retry
    assert repr(rebuilt.exc) == "ValueError('flaky')"  # Celery's task-retried event: safe_repr(exc.exc)
    assert str(rebuilt) == "Retry in 1s"


def test_a_record_without_a_repr_falls_back_to_name_and_message() -> None:
    assert repr(_remote_exception(_failure(type="ShapeMismatch", message="3 != 4"))) == "ShapeMismatch('3 != 4')"


def test_the_repr_crosses_the_protocol_reader() -> None:
    from celery_gpu.wire import protocol

    frame = protocol.read({"t": "done", "job": 1, "failed": True, "runtime": 0.1,
                           "exc": describe_failure(_raised(KeyError("gpu")))})
    assert frame is not None and frame["t"] == "done"
    assert frame["exc"]["repr"] == "KeyError('gpu')"
