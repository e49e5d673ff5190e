"""The protocol between the worker's main process and its device processes, in one place.

Every frame is a msgpack map (framing: :mod:`celery_gpu.wire.frames`) whose ``t`` names its kind. Each kind is
a ``TypedDict`` here with the function that builds it, so both ends are checked by mypy. What the main process
receives goes through :func:`read` once: it checks the kind and gives every field its type and default, so the
pool never meets a missing key, whatever a confused device process sent.

=====================  ================  =====================================================================
frame                  direction         meaning
=====================  ================  =====================================================================
``run``                main → device     run one task (the raw message body; decoded in the device process)
``batch``              main → device     run a batch of items of one batched task
``cancel``             main → device     items of the running batch revoked with terminate: do not trace them
``stop``               main → device     exit after the current task
``ready``              device → main     setup hooks done; takes work
``hb``                 device → main     heartbeat, every :data:`HEARTBEAT_EVERY` seconds, from a thread
``done``               device → main     a task ended (its outcome, the device memory the process holds)
``batch_done``         device → main     a batch ended: one outcome per item, in order
``poisoned``           device → main     a sticky CUDA error; the process exits right after
``setup_failed``       device → main     a setup hook raised; the process exits
=====================  ================  =====================================================================

A device process is started with :class:`StartSpec` (JSON in the environment variable :data:`SPEC_ENV`) and
one inherited socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from ..devices import Device
from ..errors import FrameError

__all__ = [
    "EXIT_FAULT_START", "EXIT_POISONED", "EXIT_SETUP_FAILED", "HEARTBEAT_EVERY", "PIPE_TIMEOUT", "SPEC_ENV",
    "AppSpec", "BatchDoneFrame", "BatchFrame", "CancelFrame", "Cost", "DoneFrame", "Failure", "FailureFlow",
    "FromDevice", "HeartbeatFrame", "Item", "Outcome", "PoisonedFrame", "ReadyFrame", "RunFrame",
    "SetupFailedFrame", "StartSpec", "StopFrame", "ToDevice", "add_models", "batch_done", "batch_frame", "cancel",
    "done", "failed_outcome", "failure", "heartbeat", "item", "poisoned", "read", "ready", "run", "setup_failed",
    "stop",
]

#: Environment variable carrying the JSON start-up description (:class:`StartSpec`) of a device process.
SPEC_ENV = "CELERY_GPU_SLOT"
#: Seconds between heartbeats (``hb`` frames) of a device process; the pool's watchdog reads them.
HEARTBEAT_EVERY = 1.0
#: Seconds a device process may take to read or write one frame before it is treated as dead and replaced.
PIPE_TIMEOUT = 60.0
#: Content type of a task body the main process already decoded, sent as msgpack of ``[args, kwargs, embed]``
#: (a JSON body: decoding it again in the device process cost more than the rest of the item's way there).
#: Private to the pipe: kombu knows no such serializer, so no broker message reaches the pool with it.
DECODED = "application/x-celery-gpu-decoded"
#: Exit status of a device process whose setup hook raised (after its ``setup_failed`` frame).
EXIT_SETUP_FAILED = 3
#: Exit status of a device process that failed to start by injected fault (``fail_start``).
EXIT_FAULT_START = 4
#: Exit status of a device process that stopped itself after a sticky CUDA error.
EXIT_POISONED = 70

#: How Celery treats a failure: its control-flow exceptions (retry, reject, ignore), or an error.
FailureFlow = Literal["error", "retry", "reject", "ignore"]
_KINDS: tuple[FailureFlow, ...] = ("error", "retry", "reject", "ignore")


# -- parts -------------------------------------------------------------------------------------------------------


class Failure(TypedDict):
    """A task failure as plain data (see :mod:`celery_gpu.wire.failures`)."""

    kind: FailureFlow  # Celery's control flow (retry, reject, ignore) or an error
    type: str  # the exception's class name
    module: str  # and module (never imported on the other side)
    message: str
    requeue: bool  # Reject(requeue=...)
    traceback: str
    internal: bool  # billiard's ExceptionInfo.internal
    repr: str  # what Celery's task events show of it (prefork's ``exception`` field); "" when unknown


class _Outcome(TypedDict):
    failed: bool
    runtime: float  # seconds in the device process


class Outcome(_Outcome, total=False):
    """How one task (or one item of a batch) ended."""

    retval: Any  # Celery's repr of the return value (what its request logs), when it succeeded
    exc: Failure  # when it failed
    cancelled: bool  # revoked with terminate while its batch ran: not traced


class Item(TypedDict):
    """One task message, as a device process runs it."""

    uuid: str
    request: dict[str, Any]  # Celery's request dict (headers and properties)
    body: Any  # the raw message body (bytes; a str when kombu decoded it to text)
    content_type: str
    content_encoding: str


# -- main → device -----------------------------------------------------------------------------------------------


class _Run(Item):
    t: Literal["run"]
    job: int
    name: str


class RunFrame(_Run, total=False):
    budget: int  # bytes this process's models may hold on the device while it runs (absent: no limit)


class _Batch(TypedDict):
    t: Literal["batch"]
    job: int
    name: str
    items: list[Item]


class BatchFrame(_Batch, total=False):
    budget: int


class CancelFrame(TypedDict):
    t: Literal["cancel"]
    job: int
    uuids: list[str]


class StopFrame(TypedDict):
    t: Literal["stop"]


ToDevice = RunFrame | BatchFrame | CancelFrame | StopFrame


# -- device → main -----------------------------------------------------------------------------------------------


class ReadyFrame(TypedDict):
    t: Literal["ready"]
    pid: int
    setup_s: float  # seconds the setup hooks took
    mem: int  # device memory the process holds


class HeartbeatFrame(TypedDict):
    t: Literal["hb"]


class PoisonedFrame(TypedDict):
    t: Literal["poisoned"]
    error: str
    traceback: str


class SetupFailedFrame(TypedDict):
    t: Literal["setup_failed"]
    error: str
    traceback: str


class _Done(Outcome):
    t: Literal["done"]
    job: int
    mem: int  # device memory the process holds after the task


class DoneFrame(_Done, total=False):
    peak: int  # the call's peak device memory above its start, where it can be measured
    oom_splits: int  # out-of-memory recoveries during the task
    device_s: float  # device time of the task's metered calls of task code
    energy_j: float  # their energy, where the device reports it
    models: list[tuple[str, int]]  # models the process holds after the task, least recently used first, bytes
    loaded: list[str]  # models it loaded for the task
    evicted: list[str]  # models it evicted for it


class _BatchDone(TypedDict):
    t: Literal["batch_done"]
    job: int
    items: list[Outcome]  # one per item, in order
    calls: int  # calls of the batch function (bisection adds some)
    mem: int


class BatchDoneFrame(_BatchDone, total=False):
    peak_per_item: int
    oom_splits: int
    fit: int  # the largest call that fit after an out-of-memory split
    device_s: float  # device time of the batch's calls of the function (bisection included)
    energy_j: float  # their energy, where the device reports it
    models: list[tuple[str, int]]
    loaded: list[str]
    evicted: list[str]


FromDevice = ReadyFrame | HeartbeatFrame | PoisonedFrame | SetupFailedFrame | DoneFrame | BatchDoneFrame


# -- builders ----------------------------------------------------------------------------------------------------


def failure(type_: str, module: str, message: str, *, kind: FailureFlow = "error", requeue: bool = False,
            traceback: str = "", internal: bool = False, shown: str = "") -> Failure:
    """A :class:`Failure` record (``shown``: its ``repr`` field)."""
    return {"kind": kind, "type": type_, "module": module, "message": message, "requeue": requeue,
            "traceback": traceback, "internal": internal, "repr": shown}


def failed_outcome(exc: Failure, runtime: float = 0.0) -> Outcome:
    """The outcome of a task that failed with ``exc``."""
    return {"failed": True, "exc": exc, "runtime": runtime}


def item(uuid: str, request: dict[str, Any], body: Any, content_type: str, content_encoding: str) -> Item:
    """One task message for a device process (a memoryview body becomes bytes: msgpack writes those)."""
    if isinstance(body, memoryview):
        body = body.tobytes()
    return {"uuid": uuid, "request": request, "body": body, "content_type": content_type,
            "content_encoding": content_encoding}


def run(job: int, name: str, task: Item) -> RunFrame:
    frame: RunFrame = {"t": "run", "job": job, "name": name, "uuid": task["uuid"], "request": task["request"],
                       "body": task["body"], "content_type": task["content_type"],
                       "content_encoding": task["content_encoding"]}
    return frame


def batch_frame(job: int, name: str, items: list[Item]) -> BatchFrame:
    return {"t": "batch", "job": job, "name": name, "items": items}


def cancel(job: int, uuids: list[str]) -> CancelFrame:
    return {"t": "cancel", "job": job, "uuids": uuids}


def stop() -> StopFrame:
    return {"t": "stop"}


def ready(pid: int, setup_s: float, mem: int) -> ReadyFrame:
    return {"t": "ready", "pid": pid, "setup_s": setup_s, "mem": mem}


def heartbeat() -> HeartbeatFrame:
    return {"t": "hb"}


def poisoned(error: str, traceback: str) -> PoisonedFrame:
    return {"t": "poisoned", "error": error, "traceback": traceback}


def setup_failed(error: str, traceback: str) -> SetupFailedFrame:
    return {"t": "setup_failed", "error": error, "traceback": traceback}


#: What the calls of a task or batch cost: ``(device seconds, joules or None)``.
Cost = tuple[float, float | None]


def _add_cost(frame: DoneFrame | BatchDoneFrame, cost: Cost | None) -> None:
    if cost is not None and cost[0] > 0:
        frame["device_s"] = cost[0]
        if cost[1] is not None:
            frame["energy_j"] = cost[1]


def done(job: int, outcome: Outcome, mem: int, peak: int | None, oom_splits: int,
         cost: Cost | None = None) -> DoneFrame:
    frame: DoneFrame = {"t": "done", "job": job, "mem": mem, "failed": outcome["failed"], "runtime": outcome["runtime"]}
    for key in ("retval", "exc", "cancelled"):
        if key in outcome:
            frame[key] = outcome[key]
    if peak is not None:
        frame["peak"] = peak
    if oom_splits:
        frame["oom_splits"] = oom_splits
    _add_cost(frame, cost)
    return frame


def batch_done(job: int, items: list[Outcome], calls: int, mem: int, peak_per_item: int | None,
               oom_splits: int, fit: int, cost: Cost | None = None) -> BatchDoneFrame:
    frame: BatchDoneFrame = {"t": "batch_done", "job": job, "items": items, "calls": calls, "mem": mem}
    if oom_splits:
        frame["oom_splits"], frame["fit"] = oom_splits, fit  # the pool forms batches of at most `fit` items now
    if peak_per_item is not None:
        frame["peak_per_item"] = peak_per_item
    _add_cost(frame, cost)
    return frame


# -- reading what a device process sent --------------------------------------------------------------------------


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else default
    except (TypeError, ValueError):
        return default


def _float(value: Any) -> float:
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _failure(obj: Any) -> Failure:
    d = obj if isinstance(obj, dict) else {}
    kind = d.get("kind")
    return failure(str(d.get("type") or "Exception"), str(d.get("module") or "builtins"), str(d.get("message", "")),
                   kind=kind if kind in _KINDS else "error", requeue=bool(d.get("requeue")),
                   traceback=str(d.get("traceback") or ""), internal=bool(d.get("internal")),
                   shown=str(d.get("repr") or ""))


def _outcome(obj: Any) -> Outcome:
    d = obj if isinstance(obj, dict) else {}
    out: Outcome = {"failed": bool(d.get("failed")), "runtime": _float(d.get("runtime"))}
    if out["failed"]:
        out["exc"] = _failure(d.get("exc"))
    else:
        out["retval"] = d.get("retval")
    if d.get("cancelled"):
        out["cancelled"] = True
    return out


def _maybe_int(d: dict[str, Any], key: str) -> int | None:
    return _int(d[key]) if d.get(key) is not None else None


def _cost(d: dict[str, Any]) -> Cost:
    energy = d.get("energy_j")
    return _float(d.get("device_s")), None if energy is None else _float(energy)


def add_models(frame: DoneFrame | BatchDoneFrame, resident: list[tuple[str, int]], loaded: list[str],
               evicted: list[str]) -> None:
    """What the process's models are after the work (a device process whose app declares models)."""
    frame["models"], frame["loaded"], frame["evicted"] = resident, loaded, evicted


def _read_models(d: dict[str, Any], frame: DoneFrame | BatchDoneFrame) -> None:
    models = d.get("models")
    if not isinstance(models, list):
        return
    resident = [(str(m[0]), _int(m[1])) for m in models if isinstance(m, (list, tuple)) and len(m) == 2]
    names = [[str(n) for n in d.get(k) or () if isinstance(n, str)] for k in ("loaded", "evicted")]
    add_models(frame, resident, names[0], names[1])


def _read_done(d: dict[str, Any]) -> DoneFrame:
    frame = done(_int(d.get("job"), -1), _outcome(d), _int(d.get("mem")), _maybe_int(d, "peak"),
                 _int(d.get("oom_splits")), _cost(d))
    _read_models(d, frame)
    return frame


def _read_batch_done(d: dict[str, Any]) -> BatchDoneFrame:
    items = d.get("items")
    # A malformed list stays recognisable as such (empty: the pool fails every item of the batch by name).
    outcomes = [_outcome(o) for o in items] if isinstance(items, list) else []
    frame = batch_done(_int(d.get("job"), -1), outcomes, _int(d.get("calls")), _int(d.get("mem")),
                       _maybe_int(d, "peak_per_item"), _int(d.get("oom_splits")), _int(d.get("fit")), _cost(d))
    _read_models(d, frame)
    return frame


def _read_ready(d: dict[str, Any]) -> ReadyFrame:
    pid = _int(d.get("pid"), -1)
    if pid <= 0:
        raise FrameError(f"a ready frame without a pid: {d!r:.200}")
    return ready(pid, _float(d.get("setup_s")), _int(d.get("mem")))


def read(obj: Any) -> FromDevice | None:
    """A frame from a device process with every field typed and defaulted; None for a kind this version does not
    know (ignored).

    Raises:
        FrameError: ``obj`` is not a map, or a ``ready`` frame names no pid.
    """
    if not isinstance(obj, dict):
        raise FrameError(f"expected a map, got {type(obj).__name__}")
    kind = obj.get("t")
    if kind == "hb":
        return heartbeat()
    if kind in ("done", "batch_done"):
        return _read_done(obj) if kind == "done" else _read_batch_done(obj)
    if kind == "ready":
        return _read_ready(obj)
    if kind in ("poisoned", "setup_failed"):
        error, text = str(obj.get("error")), str(obj.get("traceback") or "")
        return poisoned(error, text) if kind == "poisoned" else setup_failed(error, text)
    return None


# -- start-up ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppSpec:
    """What every device process of a pool is told: how to import the app, and how to log."""

    app: str  # "module:attr" or "/path/file.py:attr"
    modules: list[str]  # modules that define the app's tasks
    sys_path: list[str]
    hostname: str  # the worker's nodename
    loglevel: int
    logfile: str | None  # the worker's --logfile


@dataclass(frozen=True)
class StartSpec:
    """The start-up description of one device process."""

    app: AppSpec
    device: Device
    slot: int
    fd: int  # the inherited socket
    max_frame: int
    threads: int | None = None  # CPU threads of a CPU-device process (torch.set_num_threads); None: unchanged

    def dumps(self) -> str:
        """The JSON put in :data:`SPEC_ENV`."""
        a = self.app
        return json.dumps({"app": a.app, "modules": a.modules, "sys_path": a.sys_path, "hostname": a.hostname,
                           "loglevel": a.loglevel, "logfile": a.logfile, "fd": self.fd,
                           "device": self.device.to_wire(), "slot": self.slot, "max_frame": self.max_frame,
                           "threads": self.threads})

    @classmethod
    def loads(cls, text: str) -> StartSpec:
        """Inverse of :meth:`dumps`."""
        d = json.loads(text)
        app = AppSpec(str(d["app"]), list(d["modules"]), list(d["sys_path"]), str(d["hostname"]),
                      int(d["loglevel"]), d.get("logfile"))
        threads = d.get("threads")
        return cls(app, Device.from_wire(d["device"]), int(d["slot"]), int(d["fd"]), int(d["max_frame"]),
                   int(threads) if threads else None)
