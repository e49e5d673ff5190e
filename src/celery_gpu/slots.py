"""Slots and jobs: one slot is one device process; one job is one Celery task handed to the pool."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from .child import SPEC_ENV
from .devices import Device
from .frames import Channel

if TYPE_CHECKING:
    from .batch import BatchOptions
    from .batcher import Batch

__all__ = ["Job", "Slot", "SlotState", "exit_status"]

#: Seconds a device process may take to read or write one frame before it is treated as dead and replaced.
PIPE_TIMEOUT = 60.0

SlotState = Literal["stopped", "starting", "idle", "busy", "recycling", "down", "failed"]


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
        self.slot: Slot | None = None
        self.started = 0.0
        self.soft_sent = False
        self.finished = False
        self.terminated: int | None = None
        self.cancel_sent = False  # the device process was told not to trace it (terminated inside a batch)
        self.batch = batch  # set for an item of a batched task
        self.arrived = time.monotonic()
        self.auto = auto  # memory="auto": ``memory`` is set from what the pool learned, before each placement
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

    def item(self) -> dict[str, Any]:
        """The task as plain data for a device process."""
        body = self.body.tobytes() if isinstance(self.body, memoryview) else self.body
        return {
            "uuid": self.task_id, "request": self.request, "body": body,
            "content_type": self.content_type, "content_encoding": self.content_encoding,
        }

    def frame(self) -> dict[str, Any]:
        """The ``run`` frame sent to a device process."""
        return {"t": "run", "job": self.seq, "name": self.name, **self.item()}

    def terminate(self, signum: int | None = None) -> None:
        """Called by Celery when the task is revoked with ``terminate=True``."""
        self.terminated = int(signum or signal.SIGTERM)

    def worker_pids(self) -> list[int]:
        """The pid running this job, if it runs."""
        return [self.slot.pid] if self.slot is not None and self.slot.pid else []


class Slot:
    """One device process (and its pipe) pinned to a device, plus what it is doing now."""

    def __init__(self, device: Device, index: int) -> None:
        self.device = device
        self.index = index
        self.state: SlotState = "stopped"
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: Channel | None = None
        self.pid: int | None = None
        self.job: Job | Batch | None = None  # the work it runs now
        self.start_failures = 0
        self.respawn_at = 0.0
        self.tasks_done = 0
        self.process_tasks = 0  # tasks run by the current process (for --max-tasks-per-child)
        self.recycle_due = False  # replace the process once its current task is done (pool_restart)
        self.idle_since = 0.0
        self.setup_error: str | None = None
        self.crashes = 0  # deaths in a row without a task completed in between (respawn backoff)
        self.last_seen = 0.0  # when its last frame (heartbeats included) arrived
        self.death: str | None = None  # why it is dying, when known before it exits (sticky error, frozen)
        self.mem = 0  # device memory it held after its last task

    @property
    def label(self) -> str:
        """``cuda:0#1`` — device and slot index."""
        return f"{self.device.label}#{self.index}"

    def spawn(self, spec: dict[str, Any], max_frame: int) -> None:
        """Start a fresh interpreter pinned to this slot's device (``CUDA_VISIBLE_DEVICES`` set before it starts)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = self.device.cuda_visible_devices
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's indices then match NVML's
        env["CELERY_GPU_DEVICE"] = self.device.label
        env["CELERY_GPU_SLOT_INDEX"] = str(self.index)
        env[SPEC_ENV] = json.dumps(
            dict(spec, fd=theirs.fileno(), device=self.device.to_wire(), slot=self.index, max_frame=max_frame)
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery_gpu.child"], env=env, pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                # Own session: a terminal's Ctrl+C or a signal to the worker's process group reaches only the
                # worker, which then shuts down warm and lets in-flight tasks finish.
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        # A frame is read or written whole, on the loop's thread: bound how long a stalled process can hold it.
        ours.settimeout(PIPE_TIMEOUT)
        self.chan = Channel(ours, max_frame)
        self.state = "starting"
        self.setup_error = None
        self.death = None
        self.last_seen = time.monotonic()
        self.process_tasks = 0
        self.recycle_due = False

    def reap(self, grace: float = 1.0) -> int | None:
        """Close the pipe and collect the process (killing it after ``grace`` seconds); its exit status."""
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process if it is alive."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def info(self) -> dict[str, Any]:
        """JSON-friendly state for ``celery inspect stats``."""
        return {
            "slot": self.index, "pid": self.pid if self.proc is not None else None, "state": self.state,
            "task": self.job.task_id if self.job is not None else None, "tasks_done": self.tasks_done,
            "cuda_visible_devices": self.device.cuda_visible_devices, "memory_in_use": self.mem,
            **({"setup_error": self.setup_error} if self.setup_error else {}),
        }


def exit_status(code: int | None) -> str:
    """Human wording of a process exit code, as in Celery's lost-worker messages."""
    if code is None:
        return "unknown exit status"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exitcode {code}"

