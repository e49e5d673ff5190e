"""GPUPool: a Celery pool whose processes are long-lived, spawned, and pinned to one device each.

Select it with ``app.conf.worker_pool = "celery_gpu.worker.pool:GPUPool"`` (``GPU(app)`` does it; the older
``celery_gpu.pool:GPUPool`` still works). Celery's consumer stays in the main process and keeps doing what it
does (acks, events, remote control, heartbeats); this pool decides which device process runs each task, and
watches them. It is the Celery pool API over four parts: the :class:`~.scheduler.Scheduler` (what runs next,
where), the :class:`~.supervisor.Supervisor` (the processes), :class:`~.outcomes.Outcomes` (what Celery is
told) and the status snapshot (:mod:`.snapshot`).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from celery import signals
from celery.concurrency.base import BasePool

from ..devices import Device, discover
from ..errors import FrameError
from ..observe import control
from ..observe.backlog import BacklogSampler, consumed_queues
from ..observe.health import TAKING_WORK, notify_systemd
from ..observe.readings import Readings
from ..observe.snapshot import Status
from ..observe.telemetry import Telemetry
from ..payload import claims
from ..registry import record_of
from ..settings import Settings
from ..tasks.batched import BatchOptions
from ..wire import protocol
from ..wire.appref import locate_app
from . import flags, snapshot
from .admission import MemoryBook
from .loop import HubLoop, ThreadLoop, call_safely
from .outcomes import Outcomes
from .process import Slot
from .residency import Residency
from .scheduler import Scheduler
from .supervisor import TICK, Supervisor
from .work import Batch, Job, Work

__all__ = ["GPUPool"]

logger = logging.getLogger("celery_gpu.pool")
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
        record = record_of(app) if app is not None else None
        self.scheduler = Scheduler(self.devices, MemoryBook(quiet=self.settings.oom_cap_quiet),
                                   Residency(record.model_specs if record is not None else None))
        self.scheduler.model_wait = self.settings.model_wait
        self.scheduler.aging = self.settings.priority_aging
        self.scheduler.lower_first = _lower_priority_first(app)
        self.telemetry = Telemetry()
        self.outcomes = Outcomes(app, self.settings, self.telemetry, self.scheduler.book)
        self.supervisor = Supervisor(self.slots, self.settings, self.scheduler, self.outcomes, self.telemetry,
                                     self._on_done, self._dispatch, options.get("maxtasksperchild") or None)
        self._readings = Readings()
        self._seq = itertools.count(1)
        self._timer_at: float | None = None  # when a held batch is due (max_wait_ms)
        self._threaded = bool(options.get("threads", True))
        self._default_soft = options.get("soft_timeout")
        self._default_hard = options.get("timeout")
        initargs: tuple[Any, ...] = tuple(options.get("initargs") or ())
        self._hostname = initargs[1] if len(initargs) > 1 else socket.gethostname()
        self._loop: HubLoop | ThreadLoop | None = None
        self.published: Status | None = None  # the latest status(), for readers on other threads
        self._publish_at = 0.0
        self._exporter: Any = None
        self._backlog: BacklogSampler | None = None
        self._consumer_ready = False  # Celery's worker_ready: the consumer has connected
        self._announced = False  # the worker's readiness was logged (and told to systemd) once

    # -- Celery's pool API ------------------------------------------------------------------------------

    @property
    def num_processes(self) -> int:
        return len(self.slots)

    def on_start(self) -> None:
        app_ref, modules = locate_app(self.app)
        self.supervisor.app = protocol.AppSpec(
            app_ref, modules, [os.getcwd(), *sys.path], self._hostname,
            logging.getLogger("celery").getEffectiveLevel(),
            # The worker's --logfile, so device processes log where the worker does.
            next((h.baseFilename for h in logging.getLogger().handlers if hasattr(h, "baseFilename")), None),
        )
        logger.info("celery-gpu: %d device process(es) on %s", len(self.slots),
                    ", ".join(f"{d.label} ({d.name})" for d in self.devices))
        flags.emit()  # what the command line asked for that this pool does otherwise (worker_init noted it)
        if self._threaded:
            self._attach(ThreadLoop())
        for slot in self.slots:
            self.supervisor.spawn(slot)
        if isinstance(self._loop, ThreadLoop):
            self._loop.start()
        control.register_command()  # for a pool whose app has no GPU(app) (celery-gpu worker -A plain_app)
        control.register_source(self)
        signals.worker_ready.connect(self._on_worker_ready, weak=False)
        claims.defer_fetch()  # this process decodes bodies (Celery's Request) but never runs them
        if self.settings.backlog_interval:
            self._backlog = BacklogSampler(self.app, lambda: consumed_queues(self.app),
                                           self.settings.backlog_interval).start()
        if self.settings.metrics_port:
            self._start_exporter()

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
            getattr(task, "gpu_model", None),
        )
        job.max_age = getattr(task, "gpu_deadline", None)
        assert self._loop is not None, "apply_async before the pool started"
        self._loop.run(self._submit, job)
        return job

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """Revoke with terminate: signal the device process running the task (it is then replaced).

        An item of a running batch is only cancelled (it ends as ``Terminated`` when the batch returns, its
        batch-mates unharmed); the process is signalled once every item of the batch is terminated.
        """
        sig = int(signal or _SIGTERM)
        for slot in self.supervisor.running(pid):
            if isinstance(slot.job, Batch):
                # Celery marks the job terminated right after this call: decide on the next loop turn.
                assert self._loop is not None
                self._loop.call_later(0, self._kill_if_all_terminated, slot, slot.job, sig)
            else:
                slot.kill(sig)

    def restart(self) -> None:
        """``celery control pool_restart``: replace every device process, each once its current task is done.

        The fresh processes import the app and run the setup hooks again (new code, new model weights).
        """
        assert self._loop is not None
        self._loop.run(self._restart_all)

    def on_stop(self) -> None:
        """Warm shutdown: let in-flight tasks finish (up to ``shutdown_timeout``), then stop every process.

        Tasks not yet started stay unacknowledged and return to the broker with the worker's connection.
        """
        notify_systemd("STOPPING=1")
        self.supervisor.closing = True
        if isinstance(self._loop, ThreadLoop):
            # On the pool's own thread, as its last work: the processes it respawned die with it (wire/launch.py).
            self._loop.stop(final=self._shut_down, timeout=self.settings.shutdown_timeout + _STOP_GRACE + 10)
        else:
            self._shut_down()
        self._stop_monitoring()

    def _shut_down(self) -> None:
        """Wait for in-flight tasks (up to ``shutdown_timeout``), stop every process, kill what is left."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.supervisor.drain(lambda: any(s.job is not None for s in self.slots) and time.monotonic() < deadline,
                              tick=self._tick)
        self.supervisor.stop_idle()
        deadline = time.monotonic() + _STOP_GRACE
        self.supervisor.drain(lambda: any(s.chan is not None for s in self.slots) and time.monotonic() < deadline,
                              tick=self._tick)
        self.supervisor.kill_all()

    def on_terminate(self) -> None:
        """Cold shutdown: kill every device process now."""
        self.supervisor.closing = True
        if isinstance(self._loop, ThreadLoop):
            self._loop.stop()
        self.supervisor.kill_all()
        self._stop_monitoring()

    def on_close(self) -> None:
        self.supervisor.closing = True

    def status(self) -> Status:
        """Readiness, devices, their readings, processes, counters and histograms, as plain data (``inspect gpu``,
        the ``worker-gpu`` event, the metrics endpoint). Call it on the pool's loop thread."""
        return snapshot.status(self._hostname, self.devices, self.slots, self.scheduler, self.telemetry,
                               self._readings, self._consumer_ready, self._backlog)

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info.update(snapshot.stats(self.devices, self.slots, self.scheduler))
        return info

    # -- dispatching -------------------------------------------------------------------------------------

    def _attach(self, loop: HubLoop | ThreadLoop) -> None:
        self._loop = loop
        self.supervisor.attach(loop)
        loop.call_repeatedly(TICK, self._tick)

    def _submit(self, job: Job) -> None:
        error = self.scheduler.too_big(job)
        if error is not None:
            self.outcomes.reject(job, error)
            return
        self.scheduler.add(job)
        self._dispatch()

    def _dispatch(self) -> None:
        """End the waiting work whose deadline passed, then hand waiting work to idle device processes, most
        urgent first (see ``scheduler.py`` for the policy)."""
        for job in self.scheduler.expire_due(time.monotonic()):
            self.outcomes.expire(job)
        while not self.supervisor.closing:
            idle = [s for s in self.slots if s.state == "idle"]
            if not idle:
                break
            busy = any(s.state == "busy" for s in self.slots)
            picked = self.scheduler.pick(idle, busy, time.monotonic(), self._wake_at)
            if picked is None:
                break
            self._start(picked.place, picked.jobs, picked.batched)
        deadline = self.scheduler.next_deadline()
        if deadline is not None:
            self._wake_at(deadline)  # it is ended then, if it still waits

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

    def _start(self, slot: Slot, jobs: list[Job], batched: bool) -> None:
        live = []
        for job in jobs:
            if job.revoked():
                job.finished = True  # revoked while waiting here: Celery has marked and acked it
            else:
                live.append(job)
        if not live:
            return
        work: Work = Batch(next(self._seq), live) if batched else live[0]
        frame = work.frame()
        models = self.scheduler.models
        if models.declared:  # the app declares models: what this process's models may hold while it runs
            frame["budget"] = self.scheduler.budget(slot) - work.memory
        assert slot.chan is not None
        try:
            slot.chan.write(frame)
        except FrameError as exc:
            for job in live:
                self.outcomes.reject(job, exc)
            return
        except OSError:  # dead or stalled (PIPE_TIMEOUT): replace the process; the work waits for another slot
            self.scheduler.requeue(live)
            slot.discard()
            return
        slot.begin(work)
        self.scheduler.reserve(slot.device, work.memory)
        if "budget" in frame:
            models.dispatch(slot.label, work.model, frame["budget"])
        work.started = time.monotonic()
        for job in live:
            self._accepted(slot, job, work.started)
        if batched:
            self.telemetry.batch(work.name, len(live), live[0].batch.size if live[0].batch else 0)
            self.scheduler.count_batch(work.name, len(live))

    def _accepted(self, slot: Slot, job: Job, started: float) -> None:
        job.slot, job.started = slot, started
        self.telemetry.started(slot.device.label, started - job.arrived)
        if not job.deaths:  # its first run: Celery's accept callback, once (not again when it runs again)
            if job.accept_callback is not None:
                call_safely(job.accept_callback, slot.pid, started)
        else:  # run again: `inspect active` and revoke(terminate=True) must find its new process
            request = job.celery_request
            if request is not None and hasattr(request, "worker_pid"):
                request.worker_pid = slot.pid

    def _on_done(self, slot: Slot, frame: protocol.DoneFrame | protocol.BatchDoneFrame) -> None:
        work = self.scheduler.release(slot)
        ran = len(work.jobs) if work is not None else 1  # a batch counts as its items (--max-tasks-per-child)
        slot.tasks_done += ran
        slot.process_tasks += ran
        slot.crashes = 0
        slot.mem = frame["mem"]
        if "models" in frame:
            self.scheduler.models.report(slot.device.label, slot.label, frame["models"], frame.get("loaded", []),
                                         frame.get("evicted", []))
        if work is not None:
            self.outcomes.learn(slot, work, frame)
        self.supervisor.after_task(slot)
        self._dispatch()  # keep the device busy before spending time on acks and events
        if work is None or work.seq != frame["job"]:
            return
        outcomes: list[protocol.Outcome] = []
        if isinstance(work, Batch) and frame["t"] == "batch_done":
            outcomes = frame["items"]
            self.scheduler.count_calls(work.name, frame["calls"])
        elif not isinstance(work, Batch) and frame["t"] == "done":
            outcomes = [frame]
        if len(outcomes) != len(work.jobs):
            logger.error("celery-gpu: %s answered %s with a malformed outcome list", slot.label, work.name)
            malformed = protocol.failure("FrameError", "celery_gpu.errors", "malformed batch outcome")
            outcomes = [protocol.failed_outcome(malformed)] * len(work.jobs)
        for job, outcome in zip(work.jobs, outcomes, strict=True):
            self.outcomes.report(job, outcome)

    # -- revoke, restart, the periodic tick ----------------------------------------------------------------

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
                slot.chan.write(protocol.cancel(work.seq, ids))
            except OSError:
                return  # the process is gone: its exit ends the batch
            for j in work.jobs:
                j.cancel_sent = j.cancel_sent or j.terminated is not None

    def _restart_all(self) -> None:
        for slot in self.slots:
            if slot.state == "idle":
                slot.recycle()
            elif slot.state == "busy":
                slot.recycle_due = True

    def _tick(self) -> None:
        now = time.monotonic()
        if self._exporter is not None and now >= self._publish_at:
            self._publish_at = now + PUBLISH_EVERY
            self.published = self.status()
        self.supervisor.tick(now)
        if not self._announced and self._consumer_ready and all(s.state in TAKING_WORK for s in self.slots):
            self._announced = True  # once: later restarts of a process are the pool's business, not a start-up
            logger.info("celery-gpu: %s ready: %d device process(es) take work", self._hostname, len(self.slots))
            notify_systemd(f"READY=1\nSTATUS={len(self.slots)} device process(es) take work")

    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        """Celery's ``worker_ready``: this pool's consumer has connected (half of the worker's readiness)."""
        if getattr(sender, "pool", None) is self:
            self._consumer_ready = True

    def _start_exporter(self) -> None:
        from ..observe.metrics import start_exporter

        self.published = self.status()
        try:
            self._exporter = start_exporter(self.settings.metrics_port, lambda: self.published,
                                            addr=self.settings.metrics_addr)
        except OSError as exc:  # the port is taken, the address is not this host's...
            logger.error("celery-gpu: no metrics endpoint: %s; the worker runs without it", exc)
        else:
            logger.info("celery-gpu: metrics on http://%s:%d/metrics (readiness /ready, liveness /health)",
                        self.settings.metrics_addr, self._exporter.port)

    def _stop_monitoring(self) -> None:
        signals.worker_ready.disconnect(self._on_worker_ready)
        control.unregister_source(self)
        if self._backlog is not None:
            self._backlog.stop()
            self._backlog = None
        if self._exporter is not None:
            self._exporter.stop()
            self._exporter = None


def _lower_priority_first(app: Any) -> bool:
    """Whether the app's broker delivers a smaller priority number first (kombu's Redis transport), as opposed to
    a larger one (RabbitMQ's ``x-max-priority`` queues)."""
    try:
        return bool(app is not None and app.connection_for_read().transport.driver_type == "redis")
    except Exception:  # an unknown transport: RabbitMQ's order, Celery's documented default
        return False


_SIGTERM = signal.SIGTERM
_STOP_GRACE = 5.0  # seconds idle processes get to exit after their stop frame
