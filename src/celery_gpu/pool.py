"""GPUPool: a Celery pool whose processes are long-lived, spawned, and pinned to one device each.

Select it with ``app.conf.worker_pool = "celery_gpu.pool:GPUPool"`` (``GPU(app)`` does it). Celery's
consumer stays in the main process and keeps doing what it does (acks, events, remote control,
heartbeats); this pool only decides which device process runs each task, and watches them.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from typing import Any

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.concurrency.base import BasePool

from . import claimcheck, deadletter
from .admission import MemoryBook
from .batch import BatchOptions
from .batcher import Batch, Batcher
from .control import register_pool, unregister_pool
from .devices import Device, discover
from .errors import FrameError, InsufficientDeviceMemory, TaskCrashedDevice
from .failures import rebuild_einfo, rebuild_exception
from .frames import Channel
from .imports import locate_app
from .loop import HubLoop, ThreadLoop, call_safely
from .readings import Readings
from .settings import Settings
from .slots import Job, Slot, exit_status
from .telemetry import Telemetry

__all__ = ["GPUPool"]

logger = logging.getLogger("celery_gpu.pool")
TICK = 0.1  # seconds between time-limit and respawn checks
PUBLISH_EVERY = 1.0  # seconds between status snapshots for the metrics exporter (when it runs)


class GPUPool(BasePool):  # type: ignore[misc]
    """Celery pool of device processes: ``per_device`` spawned processes for each device."""

    signal_safe = False
    is_green = False
    uses_semaphore = False
    task_join_will_block = False
    body_can_be_buffer = True

    def __init__(self, limit: int | None = None, app: Any = None, **options: Any) -> None:
        super().__init__(limit=limit, app=app, **options)
        self.settings = Settings.from_app(app.conf if app is not None else None)
        self.devices: list[Device] = discover(self.settings.devices)
        self.slots = [Slot(d, k) for d in self.devices for k in range(self.settings.per_device)]
        self._pending: deque[Job] = deque()  # plain GPU tasks, FIFO
        self._batcher = Batcher()  # items of batched tasks, FIFO per task
        self._batch_stats: dict[str, list[int]] = {}  # task name -> [batches, items, calls]
        self._timer_at: float | None = None  # when a held batch is due (max_wait_ms)
        self._seq = itertools.count(1)
        self._reserved = {d.label: 0 for d in self.devices}
        self._failed: set[str] = set()
        self._failed_reason: dict[str, str] = {}
        self._threaded = bool(options.get("threads", True))
        self._default_soft = options.get("soft_timeout")
        self._default_hard = options.get("timeout")
        self._max_tasks: int | None = options.get("maxtasksperchild") or None
        initargs: tuple[Any, ...] = tuple(options.get("initargs") or ())
        self._hostname = initargs[1] if len(initargs) > 1 else socket.gethostname()
        self._loop: HubLoop | ThreadLoop | None = None
        self._closing = False
        self._spec: dict[str, Any] = {}
        self.telemetry = Telemetry()
        self._readings = Readings()
        self.published: dict[str, Any] | None = None  # the latest status(), for readers on other threads
        self._publish_at = 0.0
        self._exporter: Any = None
        self._book = MemoryBook()

    # -- Celery's pool API ------------------------------------------------------------------------------

    @property
    def num_processes(self) -> int:
        return len(self.slots)

    def on_start(self) -> None:
        app_ref, modules = locate_app(self.app)
        self._spec = {
            "app": app_ref, "modules": modules, "sys_path": [os.getcwd(), *sys.path], "hostname": self._hostname,
            "loglevel": logging.getLogger("celery").getEffectiveLevel(),
            # The worker's --logfile, so device processes log where the worker does.
            "logfile": next((h.baseFilename for h in logging.getLogger().handlers if hasattr(h, "baseFilename")),
                            None),
        }
        logger.info("celery-gpu: %d device process(es) on %s", len(self.slots),
                    ", ".join(f"{d.label} ({d.name})" for d in self.devices))
        if self._threaded:
            self._attach(ThreadLoop())
        for slot in self.slots:
            self._spawn(slot)
        if isinstance(self._loop, ThreadLoop):
            self._loop.start()
        register_pool(self)
        claimcheck.defer_fetch()  # this process decodes bodies (Celery's Request) but never runs them
        if self.settings.metrics_port:
            from .metrics import start_exporter

            self.published = self.status()
            try:
                self._exporter = start_exporter(self.settings.metrics_port, lambda: self.published,
                                                addr=self.settings.metrics_addr)
            except (OSError, RuntimeError) as exc:  # the port is taken, prometheus-client is missing...
                logger.error("celery-gpu: no metrics endpoint: %s; the worker runs without it", exc)
            else:
                logger.info("celery-gpu: metrics on http://%s:%d/metrics", self.settings.metrics_addr,
                            self._exporter.port)

    def _stop_monitoring(self) -> None:
        unregister_pool(self)
        if self._exporter is not None:
            self._exporter.stop()
            self._exporter = None

    def register_with_event_loop(self, hub: Any) -> None:
        self._attach(HubLoop(hub))

    def apply_async(self, target: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Job:
        """Queue one Celery task (``args`` as Celery's request passes them to its tracer)."""
        task = self.app.tasks.get(args[0])
        opts = getattr(task, "gpu_batch", None)
        job = Job(
            next(self._seq), tuple(args), int(getattr(task, "gpu_memory", 0) or 0),
            options.get("callback"), options.get("accept_callback"), options.get("error_callback"),
            options.get("timeout_callback"),
            options.get("soft_timeout") or self._default_soft, options.get("timeout") or self._default_hard,
            opts if isinstance(opts, BatchOptions) else None, bool(getattr(task, "gpu_memory_auto", False)),
        )
        assert self._loop is not None, "apply_async before the pool started"
        self._loop.run(self._submit, job)
        return job

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """Revoke with terminate: signal the device process running the task (it is then replaced).

        An item of a running batch is only cancelled (it ends as ``Terminated`` when the batch returns, its
        batch-mates unharmed); the process is signalled once every item of the batch is terminated.
        """
        sig = int(signal or _SIGTERM)
        for slot in self.slots:
            if slot.pid == pid and slot.job is not None:
                if isinstance(slot.job, Batch):
                    # Celery marks the job terminated right after this call: decide on the next loop turn.
                    assert self._loop is not None
                    self._loop.call_later(0, self._kill_if_all_terminated, slot, slot.job, sig)
                else:
                    slot.kill(sig)

    def _kill_if_all_terminated(self, slot: Slot, work: Batch, sig: int) -> None:
        if slot.job is not work:
            return
        if work.terminated is not None:
            slot.kill(sig)
            return
        # Tell the process which items not to trace (their results must not be stored as successes).
        ids = [j.task_id for j in work.jobs if j.terminated is not None and not j.cancel_sent]
        if ids and slot.chan is not None:
            try:
                slot.chan.write({"t": "cancel", "job": work.seq, "uuids": ids})
            except OSError:
                return  # the process is gone: its exit ends the batch
            for j in work.jobs:
                j.cancel_sent = j.cancel_sent or j.terminated is not None

    def restart(self) -> None:
        """``celery control pool_restart``: replace every device process, each once its current task is done.

        The fresh processes import the app and run the setup hooks again (new code, new model weights).
        """
        assert self._loop is not None
        self._loop.run(self._restart_all)

    def _restart_all(self) -> None:
        for slot in self.slots:
            if slot.state == "idle":
                self._recycle(slot)
            elif slot.state == "busy":
                slot.recycle_due = True

    def on_stop(self) -> None:
        """Warm shutdown: let in-flight tasks finish (up to ``shutdown_timeout``), then stop every process.

        Tasks not yet started stay unacknowledged and return to the broker with the worker's connection.
        """
        self._closing = True
        if isinstance(self._loop, ThreadLoop):
            self._loop.stop()
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self._drain(lambda: any(s.job is not None for s in self.slots) and time.monotonic() < deadline)
        for slot in self.slots:
            if slot.chan is not None and slot.job is None and slot.state in ("idle", "starting"):
                try:
                    slot.chan.write({"t": "stop"})
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        self._drain(lambda: any(s.chan is not None for s in self.slots) and time.monotonic() < deadline)
        self._kill_all()
        self._stop_monitoring()

    def on_terminate(self) -> None:
        """Cold shutdown: kill every device process now."""
        self._closing = True
        if isinstance(self._loop, ThreadLoop):
            self._loop.stop()
        self._kill_all()
        self._stop_monitoring()

    def on_close(self) -> None:
        self._closing = True

    def _batching_info(self) -> dict[str, dict[str, Any]]:
        """Per batched task: batches run, items in them, calls made (bisection included), items waiting now."""
        waiting = self._batcher.waiting()
        info = {}
        for name in sorted(set(self._batch_stats) | set(waiting)):
            b, i, c = self._batch_stats.get(name, (0, 0, 0))
            info[name] = {"batches": b, "items": i, "calls": c, "mean_batch": round(i / b, 2) if b else 0.0,
                          "waiting": waiting.get(name, 0)}
        return info

    def status(self) -> dict[str, Any]:
        """Devices, their readings, processes, counters and histograms, as plain data (``inspect gpu``, the
        ``worker-gpu`` event, the metrics exporter). Call it on the pool's loop thread."""
        devices = []
        for d in self.devices:
            info = self._device_info(d)
            slots = info["slots"]
            for slot in slots:
                slot["restarts"] = self.telemetry.restarts[(d.label, slot["slot"])]
            busy = sum(slot["state"] == "busy" for slot in slots)
            quarantined = info.pop("failed")
            devices.append({
                **info, "quarantined": quarantined, "reason": self._failed_reason.get(d.label),
                "readings": self._readings.read(d, busy, len(slots), self._reserved[d.label]),
                "counters": self.telemetry.counters(d.label),
            })
        return {
            "hostname": self._hostname, "timestamp": time.time(), "pending": len(self._pending) + len(self._batcher),
            "devices": devices, "batching": self._batching_info(), "histograms": self.telemetry.histograms(),
            "memory": self._book.info(),
        }

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update({
            "max-concurrency": len(self.slots),
            "processes": [s.pid for s in self.slots if s.proc is not None],
            "pending": len(self._pending) + len(self._batcher),
            "batching": self._batching_info(),
            "devices": [self._device_info(d) for d in self.devices],
            "memory": self._book.info(),
        })
        return info

    def _device_info(self, d: Device) -> dict[str, Any]:
        """A device and its slots as ``inspect stats`` shows them (``status()`` adds readings and counters)."""
        return {
            "device": d.label, "name": d.name, "kind": d.kind, "total_memory": d.total_memory,
            "reserved_memory": self._reserved[d.label], "failed": d.label in self._failed,
            "slots": [s.info() for s in self.slots if s.device is d],
        }

    # -- placement ---------------------------------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        live = [d for d in self.devices if d.label not in self._failed]
        if live and job.memory > max(d.total_memory for d in live):
            self._reject_at_once(job, InsufficientDeviceMemory(
                f"task {job.name} declares {job.memory} bytes of device memory; the largest device of this "
                f"worker has {max(d.total_memory for d in live)}: route it to a worker with bigger GPUs"))
            return
        if job.batch is not None:
            self._batcher.add(job)
        else:
            self._pending.append(job)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand waiting work to idle device processes, oldest first (see ``batcher.py`` for the policy)."""
        while not self._closing:
            idle = [s for s in self.slots if s.state == "idle"]
            if not idle:
                return
            picked = self._pick(idle)
            if picked is None:
                return
            slot, jobs, batched = picked
            self._start(slot, jobs, batched)

    def _pick(self, idle: list[Slot]) -> tuple[Slot, list[Job], bool] | None:
        """The work to start now and where: the oldest waiting item that fits an idle slot wins; a batch that
        is not full is held (up to its ``max_wait``) while other processes are busy."""
        now = time.monotonic()
        best: tuple[float, Slot, Job | str] | None = None
        for job in self._pending:  # the first plain task that fits (one that does not fit yet may be skipped)
            slot = self._place(self._need(job), idle, job.avoid)
            if slot is not None:
                best = (job.arrived, slot, job)
                break
        busy = any(s.state == "busy" for s in self.slots)
        for name, head, waiting in self._batcher.heads():
            assert head.batch is not None
            if busy and not head.isolate and waiting < head.batch.size and now - head.arrived < head.batch.max_wait:
                self._wake_at(head.arrived + head.batch.max_wait)
                continue
            if best is not None and best[0] <= head.arrived:
                continue
            slot = self._place(self._need(head), idle, head.avoid)
            if slot is not None:
                best = (head.arrived, slot, name)
        if best is None:
            return None
        _, slot, what = best
        if isinstance(what, Job):
            self._pending.remove(what)
            return slot, [what], False
        head = self._batcher.queues[what][0]
        assert head.batch is not None
        jobs = self._batcher.take(what, self._book.cap(what, slot.device.label, head.batch.size))
        for job in jobs:
            job.memory = head.memory  # one task: one declaration (learned ones may have changed meanwhile)
        return slot, jobs, True

    def _need(self, job: Job) -> int:
        """Device memory ``job`` reserves now: declared, or for ``memory="auto"`` what has been learned."""
        if job.auto:
            live = [d.total_memory for d in self.devices if d.label not in self._failed] or [0]
            job.memory = self._book.reserve(job.name, job.batch.size if job.batch else None, max(live))
        return job.memory

    def _wake_at(self, when: float) -> None:
        """Run the dispatcher again at ``when`` (a held batch's deadline)."""
        if self._timer_at is not None and self._timer_at <= when:
            return
        self._timer_at = when
        assert self._loop is not None
        self._loop.call_later(max(0.0, when - time.monotonic()), self._on_wake, when)

    def _on_wake(self, when: float) -> None:
        if self._timer_at == when:
            self._timer_at = None
        self._dispatch()

    def _place(self, memory: int, idle: list[Slot], avoid: set[str] | None = None) -> Slot | None:
        """Among idle slots whose device has ``memory`` free: one not in ``avoid`` (slots a task already died
        in), then the device with the most free memory, then the slot idle the longest (so work spreads over
        devices and processes)."""
        fits = [s for s in idle if s.device.total_memory - self._reserved[s.device.label] >= memory]
        if not fits:
            return None
        return max(fits, key=lambda s: (s.label not in (avoid or ()),
                                        s.device.total_memory - self._reserved[s.device.label], -s.idle_since))

    def _start(self, slot: Slot, jobs: list[Job], batched: bool) -> bool:
        live = []
        for job in jobs:
            request = getattr(job.accept_callback, "__self__", None)
            if request is not None and hasattr(request, "revoked") and request.revoked():
                job.finished = True  # revoked while waiting here: Celery has marked and acked it
            else:
                live.append(job)
        if not live:
            return False
        work: Job | Batch = Batch(next(self._seq), live) if batched else live[0]
        assert slot.chan is not None
        try:
            slot.chan.write(work.frame())
        except FrameError as exc:
            for job in live:
                self._reject_at_once(job, exc)
            return False
        except OSError:  # dead or stalled (PIPE_TIMEOUT): replace the process; the work waits for another slot
            self._requeue(live)
            slot.state = "recycling"
            slot.kill()
            return False
        slot.state, slot.job, work.slot = "busy", work, slot
        self._reserved[slot.device.label] += work.memory
        work.started = time.monotonic()
        for job in live:
            job.slot, job.started = slot, work.started
            self.telemetry.started(slot.device.label, work.started - job.arrived)
            if not job.deaths:  # its first run: Celery's accept callback, once (not again when it runs again)
                if job.accept_callback is not None:
                    call_safely(job.accept_callback, slot.pid, work.started)
            else:  # run again: `inspect active` and revoke(terminate=True) must find its new process
                request = getattr(job.accept_callback, "__self__", None)
                if request is not None and hasattr(request, "worker_pid"):
                    request.worker_pid = slot.pid
        if batched:
            self.telemetry.batch(work.name, len(live))
            stats = self._batch_stats.setdefault(work.name, [0, 0, 0])
            stats[0] += 1
            stats[1] += len(live)
        return True

    def _requeue(self, jobs: list[Job]) -> None:
        """Put jobs that did not run (or must run again) back at the front of their queues, in their order."""
        self._pending.extendleft(reversed([job for job in jobs if job.batch is None]))
        self._batcher.put_back([job for job in jobs if job.batch is not None])

    def _release(self, slot: Slot) -> Job | Batch | None:
        """Detach the slot's work, once: its memory declaration is returned to its device."""
        work, slot.job = slot.job, None
        if work is None or work.finished:
            return None
        work.finished = True
        for job in work.jobs:
            job.finished = True
        self._reserved[slot.device.label] -= work.memory
        return work

    def _reject_at_once(self, job: Job, exc: BaseException) -> None:
        # Accepting first acknowledges the message (when not acks_late): a task that can never run here must
        # not be redelivered to this worker in a loop.
        job.finished = True
        if job.accept_callback is not None:
            call_safely(job.accept_callback, os.getpid(), time.monotonic())
        if job.error_callback is not None:
            call_safely(job.error_callback, rebuild_einfo(exc))

    # -- device processes --------------------------------------------------------------------------------

    def _attach(self, loop: HubLoop | ThreadLoop) -> None:
        self._loop = loop
        for slot in self.slots:
            if slot.chan is not None:
                loop.add_reader(slot.chan.fileno(), self._on_readable, slot, slot.chan)
        loop.call_repeatedly(TICK, self._tick)

    def _spawn(self, slot: Slot) -> None:
        try:
            slot.spawn(self._spec, self.settings.max_frame)
        except OSError as exc:
            logger.error("celery-gpu: cannot start a process for %s: %s", slot.label, exc)
            self._schedule_respawn(slot, failed_start=True)
            return
        logger.debug("celery-gpu: started %s pid %s", slot.label, slot.pid)
        if self._loop is not None and slot.chan is not None:
            self._loop.add_reader(slot.chan.fileno(), self._on_readable, slot, slot.chan)

    def _on_readable(self, slot: Slot, chan: Channel) -> None:
        if slot.chan is not chan:
            return  # a stale event for a pipe already closed
        try:
            msg = chan.read()
            if not isinstance(msg, dict):
                raise FrameError(f"expected a map, got {type(msg).__name__}")
        except (EOFError, OSError, FrameError) as exc:
            if not isinstance(exc, EOFError):
                logger.error("celery-gpu: %s sent a bad or stalled frame (%r); replacing it", slot.label, exc)
                slot.kill()
            self._on_exit(slot)
            return
        slot.last_seen = time.monotonic()
        kind = msg.get("t")
        if kind == "hb":
            return
        if kind in ("done", "batch_done"):
            self._on_done(slot, msg)
        elif kind == "poisoned":  # it exits right after this frame: its exit re-runs what it was running
            slot.death = f"sticky CUDA error: {msg.get('error')}"
            logger.error("celery-gpu: %s (pid %s) hit a sticky CUDA error and is replaced; nothing it computed "
                         "after the error is reported: %s\n%s", slot.label, slot.pid, msg.get("error"),
                         msg.get("traceback", ""))
        elif kind == "ready":
            slot.state, slot.pid, slot.start_failures = "idle", int(msg["pid"]), 0
            slot.idle_since = time.monotonic()
            slot.mem = int(msg.get("mem") or 0)
            logger.info("celery-gpu: %s ready, pid %s (setup %.2fs)", slot.label, slot.pid, msg.get("setup_s", 0))
            self._dispatch()
        elif kind == "setup_failed":
            slot.setup_error = str(msg.get("error"))
            logger.error("celery-gpu: setup failed in %s (pid %s): %s\n%s", slot.label, slot.pid,
                         msg.get("error"), msg.get("traceback", ""))
            self._fail_device(slot.device, f"setup failed: {msg.get('error')}")

    def _on_done(self, slot: Slot, msg: dict[str, Any]) -> None:
        work = self._release(slot)
        ran = len(work.jobs) if work is not None else 1  # a batch counts as its items (--max-tasks-per-child)
        slot.tasks_done += ran
        slot.process_tasks += ran
        slot.crashes = 0
        slot.mem = int(msg.get("mem") or 0)
        if work is not None:
            self._learn(slot, work, msg)
        limit = self.settings.recycle_memory
        if slot.state == "busy":
            if limit and slot.mem > limit:
                logger.warning("celery-gpu: %s (pid %s) holds %d bytes of device memory after %d tasks (limit %d): "
                               "replacing it", slot.label, slot.pid, slot.mem, slot.process_tasks, limit)
                self.telemetry.leak_recycles[slot.device.label] += 1
                self._recycle(slot)
            elif slot.recycle_due or (self._max_tasks and slot.process_tasks >= self._max_tasks):
                self._recycle(slot)
            else:
                slot.state, slot.idle_since = "idle", time.monotonic()
        self._dispatch()  # keep the device busy before spending time on acks and events
        if work is None or work.seq != msg.get("job"):
            return
        outcomes = msg.get("items") if isinstance(work, Batch) else [msg]
        if not isinstance(outcomes, list) or len(outcomes) != len(work.jobs):
            logger.error("celery-gpu: %s answered %s with a malformed outcome list", slot.label, work.name)
            outcomes = [{"failed": True, "exc": {"type": "FrameError", "module": "celery_gpu.errors",
                                                 "message": "malformed batch outcome"}}] * len(work.jobs)
        if isinstance(work, Batch):
            self._batch_stats.setdefault(work.name, [0, 0, 0])[2] += int(msg.get("calls") or 0)
        for job, outcome in zip(work.jobs, outcomes, strict=True):
            self._report(job, outcome if isinstance(outcome, dict) else {})

    def _learn(self, slot: Slot, work: Job | Batch, msg: dict[str, Any]) -> None:
        """Take in what a device process measured: out-of-memory splits, the batch size that fit, peaks."""
        device = slot.device.label
        splits = int(msg.get("oom_splits") or 0)
        if splits:
            self.telemetry.oom_splits[device] += splits
        fit = int(msg.get("fit") or 0)
        if isinstance(work, Batch) and fit:
            logger.warning("celery-gpu: %s ran out of memory on %s with %d items; batches of %s there hold at "
                           "most %d items from now on", work.name, device, len(work.jobs), work.name, fit)
            self._book.fit(work.name, device, fit)
        if work.jobs[0].auto:
            self._book.learn(work.name, msg.get("peak_per_item") if isinstance(work, Batch) else msg.get("peak"))

    def _report(self, job: Job, outcome: dict[str, Any]) -> None:
        """Tell Celery how one task ended (its request acks, sends events, logs)."""
        if job.terminated is not None:  # revoked with terminate while its batch ran: the result is discarded
            if job.error_callback is not None:
                call_safely(job.error_callback, rebuild_einfo(Terminated(-job.terminated)))
            return
        runtime = float(outcome.get("runtime") or 0.0)
        if job.slot is not None:
            self.telemetry.ended(job.slot.device.label, bool(outcome.get("failed")), runtime)
        if job.callback is None:
            return
        if outcome.get("failed"):
            failure = outcome.get("exc") or {}
            einfo = rebuild_einfo(rebuild_exception(failure), failure.get("traceback"), bool(failure.get("internal")))
            call_safely(job.callback, (1, einfo, runtime))
        else:
            call_safely(job.callback, (0, outcome.get("retval"), runtime))

    def _recycle(self, slot: Slot) -> None:
        """Ask the process to exit (``--max-tasks-per-child``, ``pool_restart``); a fresh one replaces it."""
        slot.state = "recycling"
        try:
            assert slot.chan is not None
            slot.chan.write({"t": "stop"})
        except OSError:
            pass  # already gone: its exit is handled the same way

    def _on_exit(self, slot: Slot) -> None:
        if slot.chan is not None and self._loop is not None:
            self._loop.remove_reader(slot.chan.fileno())
        was = slot.state
        code = slot.reap()
        work = self._release(slot)
        death = slot.death or exit_status(code)
        again: list[Job] = []
        for job in work.jobs if work is not None else []:
            if job.terminated is not None:
                self.telemetry.ended(slot.device.label, True, None)
                if job.error_callback is not None:
                    call_safely(job.error_callback, rebuild_einfo(Terminated(-job.terminated)))
            elif self._closing:  # shutting down: no process left to run it again
                self.telemetry.ended(slot.device.label, True, None)
                if job.error_callback is not None:
                    call_safely(job.error_callback, rebuild_einfo(
                        WorkerLostError(f"Worker exited prematurely: {death} Job: {job.seq}.")))
            elif self._run_again(job, slot, death):
                again.append(job)
        self._requeue(again)
        if self._closing or was == "failed" or slot.device.label in self._failed:
            slot.state = "failed" if slot.device.label in self._failed else "stopped"
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
        self._dispatch()  # what it was running may go to another idle process now

    def _run_again(self, job: Job, slot: Slot, death: str) -> bool:
        """A task's device process died under it: True to queue it again (alone, elsewhere), or, after
        ``max_attempts`` runs, fail it with :class:`TaskCrashedDevice` (and dead-letter it) and say False."""
        job.deaths.append((slot.label, f"{slot.label} pid {slot.pid}: {death}"))
        runs, limit = len(job.deaths), self.settings.max_attempts
        if runs >= limit:
            self.telemetry.ended(slot.device.label, True, None)
            reason = (f"{job.name}[{job.task_id}] was running in a device process that died on each of its "
                      f"{runs} attempt(s) (limit gpu_max_attempts={limit}): {'; '.join(d for _, d in job.deaths)}")
            logger.error("celery-gpu: %s; it is not run again", reason)
            queue = self.settings.dead_letter_queue
            if queue:
                deadletter.publish(self.app, queue, job.task_id, job.request, job.body, job.content_type,
                                   job.content_encoding, reason, runs)
            if job.error_callback is not None:
                call_safely(job.error_callback, rebuild_einfo(TaskCrashedDevice(reason)))
            return False
        job.finished = job.soft_sent = False
        job.slot = None
        self.telemetry.reruns[slot.device.label] += 1
        logger.warning("celery-gpu: running %s[%s] again, alone (attempt %d of %d), after its process died: %s",
                       job.name, job.task_id, job.attempts, limit, death)
        return True

    def _schedule_respawn(self, slot: Slot, failed_start: bool) -> None:
        if failed_start:
            slot.start_failures += 1
            if slot.start_failures >= self.settings.start_attempts:
                self._fail_device(slot.device, f"{slot.start_failures} failed starts in a row")
                return
            delay = min(30.0, 2.0 ** (slot.start_failures - 1))
        else:  # a death: the first at once, then backing off while they keep coming with no task done between
            delay = 0.0 if slot.crashes <= 1 else min(30.0, 0.5 * 2.0 ** (slot.crashes - 2))
        slot.state = "down"
        slot.respawn_at = time.monotonic() + delay
        if not delay:
            self._spawn(slot)

    def _fail_device(self, device: Device, reason: str) -> None:
        if device.label in self._failed:
            return
        self._failed.add(device.label)
        self._failed_reason[device.label] = reason
        logger.error("celery-gpu: device %s marked failed (%s); it takes no more work", device.label, reason)
        for slot in self.slots:
            if slot.device is device:
                slot.state = "failed"
                slot.kill()
        live = [d for d in self.devices if d.label not in self._failed]
        if not live:
            from celery.worker import state

            logger.critical("celery-gpu: every device failed; stopping the worker (unstarted tasks go back "
                            "to the broker)")
            state.should_stop = 1
            return
        biggest = max(d.total_memory for d in live)
        too_big = [j for j in self._pending if j.memory > biggest]
        for job in too_big:
            self._pending.remove(job)
        for job in too_big + self._batcher.remove_if(lambda j: j.memory > biggest):
            self._reject_at_once(job, InsufficientDeviceMemory(
                f"task {job.name} declares {job.memory} bytes; no working device of this worker has that much"))

    def _tick(self) -> None:
        now = time.monotonic()
        if self._exporter is not None and now >= self._publish_at:
            self._publish_at = now + PUBLISH_EVERY
            self.published = self.status()
        for slot in self.slots:
            work = slot.job
            if work is not None and not work.finished:
                if work.soft and not work.soft_sent and now - work.started >= work.soft:
                    work.soft_sent = True
                    slot.kill(signal.SIGUSR1)
                    for job in work.jobs:
                        if job.timeout_callback is not None:
                            call_safely(job.timeout_callback, True, work.soft)
                if work.hard and now - work.started >= work.hard:
                    self._hard_timeout(slot, work)
            if slot.state == "down" and now >= slot.respawn_at and not self._closing:
                self._spawn(slot)
            elif slot.state in ("idle", "busy") and self._silent(slot, now):
                silent = now - slot.last_seen
                slot.death = f"no heartbeat for {silent:.0f}s (frozen: stuck in native code, or stopped)"
                logger.error("celery-gpu: %s (pid %s) sent no heartbeat for %.0fs: killing it", slot.label,
                             slot.pid, silent)
                slot.last_seen = now
                slot.kill(signal.SIGKILL)
            elif slot.proc is not None and slot.proc.poll() is not None and slot.chan is not None:
                # Exited without closing its pipe (a grandchild may hold it): read what it sent, then reap it.
                self._drain(lambda s=slot: s.chan is not None and _readable(s.chan.fileno()), slots=[slot])
                if slot.chan is not None:
                    self._on_exit(slot)

    def _silent(self, slot: Slot, now: float) -> bool:
        """Whether a started process's heartbeats have lapsed (and nothing of it waits unread on the pipe)."""
        limit = self.settings.heartbeat_timeout
        return bool(limit and now - slot.last_seen > limit and slot.chan is not None
                    and not _readable(slot.chan.fileno()))

    def _hard_timeout(self, slot: Slot, work: Job | Batch) -> None:
        # As billiard's prefork: fail the task with TimeLimitExceeded, tell the request, kill the process.
        # A batch is one call: every item of it ends so.
        self._release(slot)
        for job in work.jobs:
            self.telemetry.ended(slot.device.label, True, work.hard)
            if job.error_callback is not None:
                call_safely(job.error_callback, rebuild_einfo(TimeLimitExceeded(work.hard)))
            if job.timeout_callback is not None:
                call_safely(job.timeout_callback, False, work.hard)
        slot.kill(signal.SIGKILL)

    def _drain(self, keep_going: Any, slots: list[Slot] | None = None) -> None:
        """Read device-process pipes on this thread until ``keep_going()`` is false (shutdown, exit races)."""
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
                    self._on_readable(chans[chan], chan)
                if slots is None:
                    self._tick()

    def _kill_all(self) -> None:
        for slot in self.slots:
            slot.kill()
        for slot in self.slots:
            if slot.proc is not None or slot.chan is not None:
                self._on_exit(slot)


_SIGTERM = signal.SIGTERM


def _readable(fd: int) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        return bool(sel.select(0))
