"""A slot: one device process of the pool (and its pipe), pinned to a device, and what it is doing now.

A slot moves through these states, only along the arrows (:data:`MOVES`)::

    stopped ──spawn──▶ starting ──ready──▶ idle ──begin──▶ busy ──finish──▶ idle
                          │                 │  ◀──────────────┘
                          │                 └──recycle──▶ recycling        (stop frame: exit after the task)
      any ──exit──▶ down ──spawn──▶ starting                               (respawn, after a backoff)
      any ──quarantine──▶ failed                                           (its device takes no more work)
      any ──exit while the pool closes──▶ stopped
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Literal

from ..devices import Device
from ..observe.snapshot import SlotInfo
from ..wire import launch, protocol
from ..wire.frames import Channel

if TYPE_CHECKING:
    from .work import Work

__all__ = ["MOVES", "Slot", "SlotState", "exit_status"]

logger = logging.getLogger("celery_gpu.pool")

SlotState = Literal["stopped", "starting", "idle", "busy", "recycling", "down", "failed"]
_ALIVE: frozenset[SlotState] = frozenset({"starting", "idle", "busy", "recycling"})
#: The states a slot may move to from each state.
MOVES: dict[SlotState, frozenset[SlotState]] = {
    "stopped": frozenset({"starting", "down", "failed"}),
    "starting": frozenset({"idle", "down", "failed", "stopped"}),
    "idle": frozenset({"busy", "recycling", "down", "failed", "stopped"}),
    "busy": frozenset({"idle", "recycling", "down", "failed", "stopped"}),
    "recycling": frozenset({"down", "failed", "stopped"}),
    "down": frozenset({"starting", "down", "failed", "stopped"}),
    "failed": frozenset({"failed"}),
}


class Slot:
    """One device process (and its pipe) pinned to a device, plus what it is doing now."""

    def __init__(self, device: Device, index: int) -> None:
        self.device = device
        self.index = index
        self.state: SlotState = "stopped"
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: Channel | None = None
        self.pid: int | None = None
        self.job: Work | None = None  # the work it runs now
        self.start_failures = 0
        self.respawn_at = 0.0
        self.tasks_done = 0
        self.process_tasks = 0  # tasks run by the current process (for --max-tasks-per-child)
        self.recycle_due = False  # replace the process once its current task is done (pool_restart)
        self.idle_since = 0.0
        self.setup_error: str | None = None
        self.crashes = 0  # deaths in a row without a task completed in between (respawn backoff)
        self.last_seen = 0.0  # when its last frame (heartbeats included) arrived
        self.spawned_at = 0.0  # when its current process was started (the setup timeout counts from there)
        self.death: str | None = None  # why it is dying, when known before it exits (sticky error, frozen)
        self.mem = 0  # device memory it held after its last task

    @property
    def label(self) -> str:
        """``cuda:0#1`` — device and slot index."""
        return f"{self.device.label}#{self.index}"

    # -- states ------------------------------------------------------------------------------------------------

    def _move(self, to: SlotState) -> None:
        if to not in MOVES[self.state]:  # a bug in the pool: say so, never stop the worker for it
            logger.error("celery-gpu: %s moves from %s to %s, which is not one of its moves", self.label,
                         self.state, to)
        self.state = to

    def ready(self, pid: int, mem: int) -> bool:
        """Its ``ready`` frame: it takes work now. False (nothing changes) unless it was starting."""
        if self.state != "starting":
            return False
        self._move("idle")
        self.pid, self.start_failures, self.mem = pid, 0, mem
        self.idle_since = time.monotonic()
        return True

    def begin(self, work: Work) -> None:
        """``work`` was written to the process, which starts it at once."""
        self._move("busy")
        self.job, work.slot = work, self

    def detach(self) -> Work | None:
        """Detach the slot's work, once: the work it ran (marked finished), or None when it had none."""
        work, self.job = self.job, None
        if work is None or work.finished:
            return None
        work.finished = True
        for job in work.jobs:
            job.finished = True
        return work

    def finish(self) -> None:
        """Its current task is done and it stays: idle again."""
        self._move("idle")
        self.idle_since = time.monotonic()

    def recycle(self) -> None:
        """Ask the process to exit after its current task (``--max-tasks-per-child``, ``pool_restart``, leaks);
        its exit brings a fresh one."""
        self._move("recycling")
        try:
            assert self.chan is not None
            self.chan.write(protocol.stop())
        except OSError:
            pass  # already gone: its exit is handled the same way

    def discard(self) -> None:
        """Its pipe failed (dead, or stalled past ``PIPE_TIMEOUT``): kill the process; its exit brings a fresh one."""
        self._move("recycling")
        self.kill()

    def down(self, respawn_at: float) -> None:
        """It exited (or could not start); a fresh process is due at ``respawn_at``."""
        self._move("down")
        self.respawn_at = respawn_at

    def quarantine(self) -> None:
        """Its device takes no more work: the process is killed and not replaced."""
        self._move("failed")
        self.kill()

    def stopped(self) -> None:
        """It exited for good (the pool closes, or its device is quarantined)."""
        self._move("failed" if self.state == "failed" else "stopped")

    @property
    def alive(self) -> bool:
        """Whether it has a process that is (or becomes) ready for work."""
        return self.state in _ALIVE

    # -- the process -------------------------------------------------------------------------------------------

    def spawn(self, app: protocol.AppSpec, max_frame: int, threads: int | None = None,
              thread_env: dict[str, str] | None = None) -> None:
        """Start a fresh interpreter pinned to this slot's device (``CUDA_VISIBLE_DEVICES`` set before it starts;
        on the CPU device its thread budget too: ``threads``, ``thread_env``)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ, **(thread_env or {}))
        env.pop("NOTIFY_SOCKET", None)  # systemd's readiness is the worker's to tell, not a device process's
        env["CUDA_VISIBLE_DEVICES"] = self.device.cuda_visible_devices
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's indices then match NVML's
        env["CELERY_GPU_DEVICE"] = self.device.label
        env["CELERY_GPU_SLOT_INDEX"] = str(self.index)
        env[protocol.SPEC_ENV] = protocol.StartSpec(app, self.device, self.index, theirs.fileno(), max_frame,
                                                    threads).dumps()
        env[launch.PARENT_ENV] = str(os.getpid())  # it dies with us, even if we die before it has started
        try:
            self.proc = subprocess.Popen(
                launch.command(), env=env, pass_fds=[theirs.fileno()],
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
        ours.settimeout(protocol.PIPE_TIMEOUT)
        self.chan = Channel(ours, max_frame)
        self._move("starting")
        self.setup_error = None
        self.death = None
        self.last_seen = self.spawned_at = time.monotonic()
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

    def info(self) -> SlotInfo:
        """JSON-friendly state for ``celery inspect stats``."""
        info: SlotInfo = {
            "slot": self.index, "pid": self.pid if self.proc is not None else None, "state": self.state,
            "task": self.job.task_id if self.job is not None else None, "tasks_done": self.tasks_done,
            "cuda_visible_devices": self.device.cuda_visible_devices, "memory_in_use": self.mem,
        }
        if self.setup_error:
            info["setup_error"] = self.setup_error
        return info


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
