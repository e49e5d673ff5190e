"""Work in the pool: a :class:`Job` is one Celery task handed to the pool; a :class:`Batch` is items of one
batched task sent to one device process together. Both are :class:`Work`: what a device process runs at once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..devices import Device
from ..tasks.batched import BatchOptions
from ..wire import protocol

__all__ = ["Batch", "Job", "Runner", "Work"]


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
        self.arrived = time.monotonic()
        self.auto = auto  # memory="auto": ``memory`` is set from what the pool learned, before each placement
        self.model = model  # the declared model it uses (@gpu.task(model=...)), loaded where it runs
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

    def revoked(self) -> bool:
        """Whether the task was revoked while it waited here (Celery's check, which marks and acks it)."""
        request = self.celery_request
        return bool(request is not None and hasattr(request, "revoked") and request.revoked())

    def item(self) -> protocol.Item:
        """The task as plain data for a device process."""
        return protocol.item(self.task_id, self.request, self.body, self.content_type, self.content_encoding)

    def frame(self) -> protocol.RunFrame:
        """The ``run`` frame sent to a device process."""
        return protocol.run(self.seq, self.name, self.item())

    def terminate(self, signum: int | None = None) -> None:
        """Called by Celery when the task is revoked with ``terminate=True``."""
        self.terminated = int(signum or signal.SIGTERM)

    def worker_pids(self) -> list[int]:
        """The pid running this job, if it runs."""
        return [self.slot.pid] if self.slot is not None and self.slot.pid else []


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
