"""How each task of the pool ended, told to Celery once: its request's callbacks ack it, send its events and
log it, as a prefork child's results would. Every way a task ends badly in the pool (a hard time limit, a
revoke with terminate, a process lost at shutdown, too many crashes, a task that can never run here) goes
through :meth:`Outcomes.fail`, and is counted there, once.

A task whose device process died under it is run again, alone, up to ``max_attempts`` times; then it fails
with :class:`~celery_gpu.errors.TaskCrashedDevice` and, when ``dead_letter_queue`` is set, its message goes
there (decision 27).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from billiard.exceptions import Terminated, WorkerLostError
from celery.exceptions import TaskRevokedError

from ..errors import TaskCrashedDevice
from ..observe.telemetry import Telemetry
from ..settings import Settings
from ..wire import protocol
from ..wire.failures import rebuild_einfo, rebuild_failure
from . import deadletter
from .admission import MemoryBook
from .loop import call_safely
from .process import Slot
from .work import Batch, Job, Work

__all__ = ["Outcomes"]

logger = logging.getLogger("celery_gpu.pool")


class Outcomes:
    """Tells Celery how the pool's tasks ended, counts them, and decides which run again."""

    def __init__(self, app: Any, settings: Settings, telemetry: Telemetry, book: MemoryBook) -> None:
        self.app = app
        self.settings = settings
        self.telemetry = telemetry
        self.book = book

    def report(self, job: Job, outcome: protocol.Outcome) -> None:
        """A device process said how ``job`` ended."""
        if job.terminated is not None:  # revoked with terminate while its batch ran: the result is discarded
            self.fail(job, Terminated(-job.terminated))
            return
        runtime = outcome["runtime"]
        if not self._end(job, outcome["failed"], runtime) or job.callback is None:
            return
        if outcome["failed"]:
            call_safely(job.callback, (1, rebuild_failure(outcome["exc"]), runtime))
        else:
            call_safely(job.callback, (0, outcome.get("retval"), runtime))

    def fail(self, job: Job, exc: BaseException, runtime: float | None = None) -> None:
        """``job`` ends with ``exc`` (the pool's own verdict, not the task's): counted on its device once, and
        Celery's error callback."""
        if self._end(job, True, runtime) and job.error_callback is not None:
            call_safely(job.error_callback, rebuild_einfo(exc))

    def _end(self, job: Job, failed: bool, runtime: float | None) -> bool:
        """Mark ``job`` ended and count it on its device; False if it had ended already (told once)."""
        if job.ended:
            return False
        job.ended = True
        if job.slot is not None:
            self.telemetry.ended(job.slot.device.label, failed, runtime)
        return True

    def expire(self, job: Job) -> None:
        """``job``'s deadline passed while it waited: Celery ends it as an expired task (REVOKED, a
        ``task-revoked`` event with ``expired=True``, acknowledged); it never ran, so it is counted apart."""
        job.finished = True
        self.telemetry.expired[job.name] += 1
        if not job.expire():  # no Celery request to tell (never the case in a worker)
            self.fail(job, TaskRevokedError(f"{job.name}[{job.task_id}] expired while it waited in the pool"))

    def reject(self, job: Job, exc: BaseException) -> None:
        """A task that can never run here fails at once; it is accepted first, which acknowledges its message
        (when not ``acks_late``), so it is not redelivered to this worker in a loop."""
        job.finished = True
        if job.accept_callback is not None:
            call_safely(job.accept_callback, os.getpid(), time.monotonic())
        self.fail(job, exc)

    def lost(self, job: Job, slot: Slot, death: str, closing: bool) -> bool:
        """``job``'s device process died under it (``death`` says how): True to queue it again (alone,
        elsewhere); else it has ended here."""
        if job.terminated is not None:
            self.fail(job, Terminated(-job.terminated))
            return False
        if closing:  # shutting down: no process left to run it again
            self.fail(job, WorkerLostError(f"Worker exited prematurely: {death} Job: {job.seq}."))
            return False
        job.deaths.append((slot.label, f"{slot.label} pid {slot.pid}: {death}"))
        runs, limit = len(job.deaths), self.settings.max_attempts
        if runs >= limit:
            self._crashed(job, runs, limit)
            return False
        job.finished = job.soft_sent = False
        job.slot = None
        self.telemetry.reruns[slot.device.label] += 1
        logger.warning("celery-gpu: running %s[%s] again, alone (attempt %d of %d), after its process died: %s",
                       job.name, job.task_id, job.attempts, limit, death)
        return True

    def _crashed(self, job: Job, runs: int, limit: int) -> None:
        reason = (f"{job.name}[{job.task_id}] was running in a device process that died on each of its "
                  f"{runs} attempt(s) (limit gpu_max_attempts={limit}): {'; '.join(d for _, d in job.deaths)}")
        logger.error("celery-gpu: %s; it is not run again", reason)
        queue = self.settings.dead_letter_queue
        if queue:
            deadletter.publish(self.app, queue, job.task_id, job.request, job.body, job.content_type,
                               job.content_encoding, reason, runs)
        self.fail(job, TaskCrashedDevice(reason))

    def learn(self, slot: Slot, work: Work, frame: protocol.DoneFrame | protocol.BatchDoneFrame) -> None:
        """Take in what a device process measured: the calls' cost, out-of-memory splits, the batch size that
        fit, peaks."""
        device = slot.device.label
        self.telemetry.cost(work.name, len(work.jobs), frame.get("device_s", 0.0), frame.get("energy_j"))
        splits = frame.get("oom_splits", 0)
        if splits:
            self.telemetry.oom_splits[device] += splits
        if frame["t"] == "batch_done":
            fit, peak = frame.get("fit", 0), frame.get("peak_per_item")
        else:
            fit, peak = 0, frame.get("peak")
        if isinstance(work, Batch) and fit:
            logger.warning("celery-gpu: %s ran out of memory on %s with %d items; batches of %s there hold at "
                           "most %d items from now on", work.name, device, len(work.jobs), work.name, fit)
            self.book.fit(work.name, device, fit)
        if work.jobs[0].auto:
            self.book.learn(work.name, peak)
