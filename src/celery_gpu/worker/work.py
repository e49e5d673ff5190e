"""Work in the pool: a :class:`Job` is one Celery task handed to the pool; a :class:`Batch` is items of one
batched task sent to one device process together. Both are :class:`Work`: what a device process runs at once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import msgpack

from ..devices import Device
from ..tasks.batched import BatchOptions
from ..wire import protocol

__all__ = ["Batch", "Job", "Runner", "Work"]

#: Keys of Celery's request dict that hold the decoded body: not sent to a device process, which decodes it.
_DECODED = frozenset({"args", "kwargs"})


class Runner(Protocol):
    """Where work runs (a :class:`~celery_gpu.worker.process.Slot`), as far as the work needs to know."""

    @property
    def device(self) -> Device: ...

    @property
    def pid(self) -> int | None: ...


class Work(Protocol):
    """What a device process runs at once: one plain task (a :class:`Job`) or one :class:`Batch`."""

    seq: int  # the ``job`` number of its frames
    name: str
    task_id: str  # for logs ("<id> +3 more" for a batch)
    memory: int  # device memory it reserves while it runs
    model: str | None  # the model it uses
    soft: float | None  # time limits, seconds
    hard: float | None
    slot: Runner | None
    started: float
    soft_sent: bool
    finished: bool

    @property
    def jobs(self) -> list[Job]: ...

    @property
    def terminated(self) -> int | None: ...

    def frame(self) -> protocol.RunFrame | protocol.BatchFrame: ...


class Job:
    """A task in the pool; Celery's request keeps a weak reference to it (``terminate``, ``worker_pids``)."""

    # Its place while it waits (set by the scheduler, see ``queues.py``).
    key = 0.0  # when it arrived, moved earlier by its priority: the smallest leaves first
    level = 0  # its priority level, larger = more urgent (its Celery priority in the broker's order)
    deadline: float | None = None  # monotonic time by which it must start (its expires / the task's deadline_ms)
    entry = 0  # its current entry in the waiting queues
    waiting = False  # whether it waits in a queue now
    max_age: float | None = None  # the task's deadline_ms, in seconds from its arrival in the pool
    model: str | None = None  # the declared model it uses (@gpu.task(model=...)), loaded where it runs

    def __init__(
        self,
        seq: int,
        args: tuple[Any, ...],
        memory: int,
        callback: Callable[..., Any] | None,
        accept_callback: Callable[..., Any] | None,
        error_callback: Callable[..., Any] | None,
        timeout_callback: Callable[..., Any] | None,
        soft: float | None,
        hard: float | None,
        batch: BatchOptions | None = None,
        auto: bool = False,
        model: str | None = None,
    ) -> None:
        self.seq = seq
        self.name, self.task_id, self.request, self.body, self.content_type, self.content_encoding = args
        self.memory = memory
        self.callback = callback
        self.accept_callback = accept_callback
        self.error_callback = error_callback
        self.timeout_callback = timeout_callback
        self.soft = soft or None
        self.hard = hard or None
        self.slot: Runner | None = None
        self.started = 0.0
        self.soft_sent = False
        self.finished = False  # detached from its process (it ended, or waits to run again)
        self.ended = False  # Celery was told how it ended (once)
        self.terminated: int | None = None
        self.cancel_sent = False  # the device process was told not to trace it (terminated inside a batch)
        self.batch = batch  # set for an item of a batched task
        self.arrived = self.key = time.monotonic()
        self.entry, self.waiting = 0, False  # set here too: every job's attributes in one shape (faster)
        self.auto = auto  # memory="auto": ``memory`` is set from what the pool learned, before each placement
        self.model = model
        self.deaths: list[tuple[str, str]] = []  # (slot label, what happened) per device process that died under it

    @property
    def attempts(self) -> int:
        """Its run now or next, counting from 1: one more than the processes that died under it."""
        return len(self.deaths) + 1

    @property
    def isolate(self) -> bool:
        """Run it alone (never in a batch): a process died while it was in flight, and it may be the cause."""
        return bool(self.deaths)

    @property
    def avoid(self) -> set[str]:
        """Slots it died in: it is placed elsewhere when there is a choice."""
        return {label for label, _ in self.deaths}

    @property
    def jobs(self) -> list[Job]:
        """The Celery tasks this work carries: itself (a :class:`Batch` carries many)."""
        return [self]

    @property
    def celery_request(self) -> Any:
        """Celery's ``Request`` of the task (the owner of its accept callback), if there is one."""
        return getattr(self.accept_callback, "__self__", None)

    def priority(self) -> int:
        """The Celery priority of its message (0 when it has none), as the broker received it."""
        request = self.request
        info = request.get("delivery_info")
        value = info.get("priority") if info else None
        if value is None:
            properties = request.get("properties")
            value = properties.get("priority") if properties else None
            if value is None:
                return 0
        try:
            return max(0, min(255, int(value)))
        except (TypeError, ValueError):
            return 0

    def expires_at(self) -> float | None:
        """Its message's ``expires`` as a POSIX time, or None."""
        raw = self.request.get("expires")
        if not raw:
            return None
        expires = getattr(self.celery_request, "expires", None)  # Celery's Request parsed it already
        if expires is None:
            from celery.utils.time import maybe_iso8601, maybe_make_aware

            try:
                expires = maybe_make_aware(maybe_iso8601(raw))
            except (TypeError, ValueError, AttributeError):
                return None
        return float(expires.timestamp())

    def deadline_from(self, now: float) -> float | None:
        """The monotonic time by which it must start: its ``expires``, or the task's ``deadline_ms`` after its
        arrival, whichever comes first; None when it has neither."""
        expires = self.expires_at()
        deadline = None if expires is None else now + (expires - time.time())
        if self.max_age is not None:
            own = self.arrived + self.max_age
            deadline = own if deadline is None else min(deadline, own)
        return deadline

    def expire(self) -> bool:
        """Its deadline passed while it waited: end it as Celery ends an expired task (REVOKED, ``task-revoked``
        with ``expired=True``, acknowledged, the ``task_revoked`` signal); False when it has no Celery request."""
        request = self.celery_request
        if request is None or not hasattr(request, "revoked"):
            return False
        if hasattr(request, "expires"):  # Celery's Request: expired by its own rule, whoever set the deadline
            now = datetime.now(timezone.utc)
            if request.expires is None or request.expires >= now:
                request.expires = now - timedelta(microseconds=1)
        return bool(request.revoked())

    def revoked(self) -> bool:
        """Whether the task was revoked while it waited here (Celery's check, which marks and acks it)."""
        request = self.celery_request
        return bool(request is not None and hasattr(request, "revoked") and request.revoked())

    def item(self) -> protocol.Item:
        """The task as plain data for a device process: Celery's request without the arguments it decoded (the
        device process decodes the body itself; numpy arrays among them cost milliseconds each to pack as text)."""
        request = self.request
        if "args" in request or "kwargs" in request:
            request = {k: v for k, v in request.items() if k not in _DECODED}
        if self.content_type == "application/json":
            decoded = _packed_payload(self.celery_request)
            if decoded is not None:
                return protocol.item(self.task_id, request, decoded, protocol.DECODED, "binary")
        return protocol.item(self.task_id, request, self.body, self.content_type, self.content_encoding)

    def frame(self) -> protocol.RunFrame:
        """The ``run`` frame sent to a device process."""
        return protocol.run(self.seq, self.name, self.item())

    def terminate(self, signum: int | None = None) -> None:
        """Called by Celery when the task is revoked with ``terminate=True``."""
        self.terminated = int(signum or signal.SIGTERM)

    def worker_pids(self) -> list[int]:
        """The pid running this job, if it runs."""
        return [self.slot.pid] if self.slot is not None and self.slot.pid else []


def _packed_payload(celery_request: Any) -> bytes | None:
    """The body Celery decoded for ``celery_request`` (kombu keeps it), as msgpack; None where msgpack cannot
    carry it exactly (kombu's JSON gives datetimes, UUIDs, Decimals, integers beyond 64 bits...: then the device
    process decodes the body itself, as before).

    A JSON body of 512 floats took about 200 µs to decode; packing and unpacking it, about 5 µs each."""
    message = getattr(celery_request, "message", None)
    payload = getattr(message, "_decoded_cache", None)
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        return None
    try:
        packed: bytes = msgpack.packb(payload, use_bin_type=True)  # strict: no default, nothing becomes text
    except Exception:
        return None
    return packed


class Batch:
    """Items of one batched task sent to one device process together; each item keeps its own :class:`Job`."""

    def __init__(self, seq: int, jobs: list[Job]) -> None:
        self.seq = seq
        self.jobs = jobs
        self.name = jobs[0].name
        self.task_id = f"{jobs[0].task_id} +{len(jobs) - 1} more" if len(jobs) > 1 else jobs[0].task_id
        self.memory = max(j.memory for j in jobs)  # a batched task declares the memory of one call
        self.model = jobs[0].model
        softs = [j.soft for j in jobs if j.soft]
        hards = [j.hard for j in jobs if j.hard]
        self.soft: float | None = max(softs) if softs else None  # the call runs under its items' longest limit
        self.hard: float | None = max(hards) if hards else None
        self.slot: Runner | None = None
        self.started = 0.0
        self.soft_sent = False
        self.finished = False

    @property
    def terminated(self) -> int | None:
        """The signal when every item was revoked with terminate (then the process is killed), else None."""
        sigs = [j.terminated for j in self.jobs]
        return sigs[0] if sigs and all(s is not None for s in sigs) else None

    def frame(self) -> protocol.BatchFrame:
        """The ``batch`` frame sent to a device process."""
        return protocol.batch_frame(self.seq, self.name, [j.item() for j in self.jobs])

    def terminate(self, signum: int | None = None) -> None:
        """Terminate every item."""
        for j in self.jobs:
            j.terminated = int(signum or signal.SIGTERM)
