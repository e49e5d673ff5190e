"""The pool's device processes kept alive and honest: started, read, replaced when they exit (backing off when
they keep dying), quarantined with their device when they cannot start (a setup hook that raises, or that does
not finish within ``setup_timeout``) or keep hitting sticky CUDA errors (``sticky_limit`` in ``sticky_window``),
recycled when they leak, killed when their work overruns its hard time limit or they stop sending heartbeats.

Everything here runs on the pool's loop thread. What a process *ran* is the pool's and the scheduler's: the
supervisor hands ``done`` frames to the pool, and the work of a process that died to :class:`Outcomes`.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from collections import defaultdict, deque
from collections.abc import Callable

from billiard.exceptions import TimeLimitExceeded

from ..errors import FrameError, InsufficientDeviceMemory
from ..observe.telemetry import Telemetry
from ..settings import Settings
from ..wire import protocol
from ..wire.frames import Channel
from .loop import HubLoop, ThreadLoop, call_safely
from .outcomes import Outcomes
from .process import Slot, exit_status
from .scheduler import Scheduler
from .threads import thread_env
from .work import Work

__all__ = ["TICK", "Supervisor"]

logger = logging.getLogger("celery_gpu.pool")
TICK = 0.1  # seconds between time-limit, heartbeat and respawn checks

OnDone = Callable[[Slot, "protocol.DoneFrame | protocol.BatchDoneFrame"], None]


class Supervisor:
    """Device processes of one pool: their life cycle and watchdogs."""

    def __init__(self, slots: list[Slot], settings: Settings, scheduler: Scheduler, outcomes: Outcomes,
                 telemetry: Telemetry, on_done: OnDone, dispatch: Callable[[], None],
                 max_tasks: int | None = None) -> None:
        self.slots = slots
        self.settings = settings
        self.max_tasks = max_tasks  # --max-tasks-per-child
        self.scheduler = scheduler
        self.outcomes = outcomes
        self.telemetry = telemetry
        self.on_done = on_done
        self.dispatch = dispatch
        self.app: protocol.AppSpec | None = None  # how device processes import the app (set when the pool starts)
        self.loop: HubLoop | ThreadLoop | None = None
        self.closing = False
        # device label -> (time, tasks in flight) of the recent sticky errors counted against it
        self.sticky: dict[str, deque[tuple[float, frozenset[str]]]] = defaultdict(deque)

    # -- starting ------------------------------------------------------------------------------------------------

    def attach(self, loop: HubLoop | ThreadLoop) -> None:
        """Read the pipes on ``loop`` (the pool runs :meth:`tick` from its own timer)."""
        self.loop = loop
        for slot in self.slots:
            if slot.chan is not None:
                loop.add_reader(slot.chan.fileno(), self.on_readable, slot, slot.chan)

    def spawn(self, slot: Slot) -> None:
        """Start a process for ``slot`` (a failure to start counts as a failed start)."""
        assert self.app is not None, "spawn before the pool started"
        threads, env = None, None
        if slot.device.kind == "cpu":  # a thread budget, so the CPU device's processes do not oversubscribe it
            cpu_slots = sum(s.device.kind == "cpu" for s in self.slots)
            threads, env = thread_env(self.settings.cpu_threads, cpu_slots, os.environ)
        try:
            slot.spawn(self.app, self.settings.max_frame, threads, env)
        except OSError as exc:
            logger.error("celery-gpu: cannot start a process for %s: %s", slot.label, exc)
            self._schedule_respawn(slot, failed_start=True)
            return
        logger.debug("celery-gpu: started %s pid %s", slot.label, slot.pid)
        if self.loop is not None and slot.chan is not None:
            self.loop.add_reader(slot.chan.fileno(), self.on_readable, slot, slot.chan)

    # -- frames --------------------------------------------------------------------------------------------------

    def on_readable(self, slot: Slot, chan: Channel) -> None:
        """A frame (or the end of the pipe) from ``slot``'s process."""
        if slot.chan is not chan:
            return  # a stale event for a pipe already closed
        try:
            frame = protocol.read(chan.read())
        except (EOFError, OSError, FrameError) as exc:
            if not isinstance(exc, EOFError):
                logger.error("celery-gpu: %s sent a bad or stalled frame (%r); replacing it", slot.label, exc)
                slot.kill()
            self.on_exit(slot)
            return
        slot.last_seen = time.monotonic()
        if frame is None or frame["t"] == "hb":
            return
        if frame["t"] == "done" or frame["t"] == "batch_done":
            chan.trim()  # it has read the work we sent: a huge body's pages go back now, not with the next task
            self.on_done(slot, frame)
        elif frame["t"] == "poisoned":  # it exits right after this frame: its exit re-runs what it was running
            slot.death = f"sticky CUDA error: {frame['error']}"
            logger.error("celery-gpu: %s (pid %s) hit a sticky CUDA error and is replaced; nothing it computed "
                         "after the error is reported: %s\n%s", slot.label, slot.pid, frame["error"],
                         frame["traceback"])
            self._count_sticky(slot)
        elif frame["t"] == "ready":
            if slot.ready(frame["pid"], frame["mem"]):
                logger.info("celery-gpu: %s ready, pid %s (setup %.2fs)", slot.label, slot.pid, frame["setup_s"])
                self.dispatch()
        elif frame["t"] == "setup_failed":
            slot.setup_error = frame["error"]
            logger.error("celery-gpu: setup failed in %s (pid %s): %s\n%s", slot.label, slot.pid,
                         frame["error"], frame["traceback"])
            self.quarantine(slot, f"setup failed: {frame['error']}")

    def after_task(self, slot: Slot) -> None:
        """``slot`` finished its work: recycle it if it holds too much memory, has run its ``max_tasks`` or is
        due for a ``pool_restart``; else it is idle again."""
        if slot.state != "busy":
            return
        limit = self.settings.recycle_memory
        if limit and slot.mem > limit:
            logger.warning("celery-gpu: %s (pid %s) holds %d bytes of device memory after %d tasks (limit %d): "
                           "replacing it", slot.label, slot.pid, slot.mem, slot.process_tasks, limit)
            self.telemetry.leak_recycles[slot.device.label] += 1
            slot.recycle()
        elif slot.recycle_due or (self.max_tasks and slot.process_tasks >= self.max_tasks):
            slot.recycle()
        else:
            slot.finish()

    # -- exits ---------------------------------------------------------------------------------------------------

    def on_exit(self, slot: Slot) -> None:
        """``slot``'s process exited (or its pipe broke): what it ran ends or runs again, and it is replaced."""
        if slot.chan is not None and self.loop is not None:
            self.loop.remove_reader(slot.chan.fileno())
        was = slot.state
        code = slot.reap()
        work = self.scheduler.release(slot)
        self.scheduler.models.clear(slot.label)  # its models went with it
        death = slot.death or exit_status(code)
        again = [job for job in (work.jobs if work is not None else [])
                 if self.outcomes.lost(job, slot, death, self.closing)]
        self.scheduler.requeue(again)
        if self.closing or was == "failed" or slot.device.label in self.scheduler.quarantined:
            slot.stopped()
            if again:
                self.dispatch()  # its device is out of service (repeated sticky errors): the rest run them
            return
        if was == "recycling" and work is None:
            logger.info("celery-gpu: %s (pid %s) replaced after %d tasks", slot.label, slot.pid, slot.process_tasks)
        else:
            logger.warning("celery-gpu: %s (pid %s) exited with %s%s", slot.label, slot.pid, death,
                           f" while running {work.name}[{work.task_id}]" if work else "")
            slot.crashes += was != "starting"  # failed starts back off on their own count
        if was != "starting":
            self.telemetry.restarted(slot.device.label, slot.index)
        self._schedule_respawn(slot, failed_start=was == "starting")
        self.dispatch()  # what it was running may go to another idle process now

    def _schedule_respawn(self, slot: Slot, failed_start: bool) -> None:
        if failed_start:
            slot.start_failures += 1
            if slot.start_failures >= self.settings.start_attempts:
                self.quarantine(slot, f"{slot.start_failures} failed starts in a row")
                return
            delay = min(30.0, 2.0 ** (slot.start_failures - 1))
        else:  # a death: the first at once, then backing off while they keep coming with no task done between
            delay = 0.0 if slot.crashes <= 1 else min(30.0, 0.5 * 2.0 ** (slot.crashes - 2))
        slot.down(time.monotonic() + delay)
        if not delay:
            self.spawn(slot)

    def _count_sticky(self, slot: Slot) -> None:
        """One more sticky error on ``slot``'s device: out of service after ``sticky_limit`` in the window.

        An error counts only when none of the tasks in flight was in flight at an error counted before in the
        window: a poison task that breaks every process it runs in (its re-runs, bounded by ``max_attempts``)
        counts once; it is the task's fault, and its dead letter's business, not the device's."""
        label = slot.device.label
        self.telemetry.sticky_errors[label] += 1
        limit, window = self.settings.sticky_limit, self.settings.sticky_window
        if not limit:
            return
        now = time.monotonic()
        recent = self.sticky[label]
        while recent and now - recent[0][0] > window:
            recent.popleft()
        tasks = frozenset(job.task_id for job in slot.job.jobs) if slot.job is not None else frozenset()
        if any(tasks & earlier for _, earlier in recent):
            return
        recent.append((now, tasks))
        if len(recent) >= limit:
            self.quarantine(slot, f"{len(recent)} sticky CUDA errors within {window:g}s "
                                  f"(gpu_sticky_limit={limit}); last: {slot.death}")

    def quarantine(self, slot: Slot, reason: str) -> None:
        """``slot``'s device takes no more work: its processes are killed, and tasks that no working device can
        hold fail. With no device left the worker stops (unstarted tasks go back to the broker)."""
        device = slot.device
        if device.label in self.scheduler.quarantined:
            return
        too_big = self.scheduler.quarantine(device, reason)
        logger.error("celery-gpu: device %s marked failed (%s); it takes no more work", device.label, reason)
        for other in self.slots:
            if other.device is device:
                other.quarantine()
        if not self.scheduler.live():
            from celery.worker import state

            logger.critical("celery-gpu: every device failed; stopping the worker (unstarted tasks go back "
                            "to the broker)")
            state.should_stop = 1
            return
        for job in too_big:
            self.outcomes.reject(job, InsufficientDeviceMemory(
                f"task {job.name} declares {job.memory} bytes; no working device of this worker has that much"))

    # -- watchdogs -----------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Time limits, due respawns, heartbeat lapses, and processes that exited without closing their pipe."""
        for slot in self.slots:
            work = slot.job
            if work is not None and not work.finished:
                self._limits(slot, work, now)
            if slot.state == "down" and now >= slot.respawn_at and not self.closing:
                self.spawn(slot)
            elif slot.state == "starting" and self._setup_overdue(slot, now):
                limit = self.settings.setup_timeout
                slot.setup_error = f"setup did not finish within {limit:g}s (gpu_setup_timeout)"
                logger.error("celery-gpu: %s (pid %s) is still starting after %.0fs (importing the app and running "
                             "the @gpu.setup hooks); killing it", slot.label, slot.pid, now - slot.spawned_at)
                self.quarantine(slot, slot.setup_error)
            elif slot.state in ("idle", "busy") and self._silent(slot, now):
                silent = now - slot.last_seen
                slot.death = f"no heartbeat for {silent:.0f}s (frozen: stuck in native code, or stopped)"
                logger.error("celery-gpu: %s (pid %s) sent no heartbeat for %.0fs: killing it", slot.label,
                             slot.pid, silent)
                slot.last_seen = now
                slot.kill(signal.SIGKILL)
            elif slot.proc is not None and slot.proc.poll() is not None and slot.chan is not None:
                self._reap_exited(slot)

    def _reap_exited(self, slot: Slot) -> None:
        """It exited without closing its pipe (a grandchild may hold it): read what it sent, then reap it."""
        self.drain(lambda: slot.chan is not None and _readable(slot.chan.fileno()), slots=[slot])
        if slot.chan is not None:
            self.on_exit(slot)

    def _limits(self, slot: Slot, work: Work, now: float) -> None:
        if work.soft and not work.soft_sent and now - work.started >= work.soft:
            work.soft_sent = True
            slot.kill(signal.SIGUSR1)
            for job in work.jobs:
                if job.timeout_callback is not None:
                    call_safely(job.timeout_callback, True, work.soft)
        if work.hard and now - work.started >= work.hard:
            self._hard_timeout(slot, work, work.hard)

    def _hard_timeout(self, slot: Slot, work: Work, limit: float) -> None:
        # As billiard's prefork: fail the task with TimeLimitExceeded, tell the request, kill the process.
        # A batch is one call: every item of it ends so.
        self.scheduler.release(slot)
        for job in work.jobs:
            self.outcomes.fail(job, TimeLimitExceeded(limit), runtime=limit)
            if job.timeout_callback is not None:
                call_safely(job.timeout_callback, False, limit)
        slot.kill(signal.SIGKILL)

    def _setup_overdue(self, slot: Slot, now: float) -> bool:
        """Whether a starting process has been starting for longer than ``setup_timeout``."""
        limit = self.settings.setup_timeout
        return bool(limit and now - slot.spawned_at > limit)

    def _silent(self, slot: Slot, now: float) -> bool:
        """Whether a started process's heartbeats have lapsed (and nothing of it waits unread on the pipe)."""
        limit = self.settings.heartbeat_timeout
        return bool(limit and now - slot.last_seen > limit and slot.chan is not None
                    and not _readable(slot.chan.fileno()))

    # -- stopping ------------------------------------------------------------------------------------------------

    def drain(self, keep_going: Callable[[], bool], slots: list[Slot] | None = None,
              tick: Callable[[], None] | None = None) -> None:
        """Read device-process pipes on this thread until ``keep_going()`` is false (shutdown, exit races);
        ``tick`` runs between reads."""
        with selectors.DefaultSelector() as sel:
            while keep_going():
                chans = {s.chan: s for s in (slots or self.slots) if s.chan is not None}
                for key in list(sel.get_map().values()):
                    sel.unregister(key.fileobj)
                for chan in chans:
                    sel.register(chan.fileno(), selectors.EVENT_READ, chan)
                if not chans:
                    return
                for key, _ in sel.select(TICK):
                    chan = key.data
                    self.on_readable(chans[chan], chan)
                if tick is not None:
                    tick()

    def stop_idle(self) -> None:
        """Ask every process without work to exit (warm shutdown, after the in-flight tasks)."""
        for slot in self.slots:
            if slot.chan is not None and slot.job is None and slot.state in ("idle", "starting"):
                try:
                    slot.chan.write(protocol.stop())
                except OSError:
                    pass

    def kill_all(self) -> None:
        """Kill every process now and account for what each was running."""
        for slot in self.slots:
            slot.kill()
        for slot in self.slots:
            if slot.proc is not None or slot.chan is not None:
                self.on_exit(slot)

    def running(self, pid: int) -> list[Slot]:
        """The slots whose process is ``pid`` and runs work (for revoke with terminate)."""
        return [s for s in self.slots if s.pid == pid and s.job is not None]


def _readable(fd: int) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(0))
