"""The device process: ``celery_gpu.device`` run as ``__main__`` (by the launcher of :mod:`celery_gpu.wire.launch`,
which has tied it to its parent already), started by the pool with its device already pinned.

It imports the Celery app, runs the ``@gpu.setup`` hooks once, tells the pool it is ready, then runs one
task or batch at a time with Celery's own tracer (results stored in the backend from here, as in prefork),
and answers each with one ``done`` or ``batch_done`` frame. Everything on the pipe is a msgpack frame
(:mod:`celery_gpu.wire.protocol`); nothing is unpickled.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..devices import Device, set_current
from ..registry import record_of
from ..settings import Settings
from ..wire import protocol
from ..wire.appref import import_app
from ..wire.frames import Channel
from . import context, cost, faults, memory, tracing
from .batch import run_batch
from .context import DeviceContext
from .models import ModelCache
from .tracing import run_task

__all__ = ["main"]

Send = Callable[[Any], None]


def _on_soft_limit(signum: int, frame: FrameType | None) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    if context.current().in_task:  # a late signal after the task ended must not break the next read of the pipe
        raise SoftTimeLimitExceeded()


def _setup_logging(app: Any, loglevel: int, logfile: str | None) -> None:
    """Log as the worker does: Celery's own setup (its format, the ``setup_logging`` signal, ``--logfile``)."""
    app.log.setup_logging_subsystem(loglevel=loglevel, logfile=logfile)
    if app.conf.worker_redirect_stdouts:
        app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)


def _sender(chan: Channel) -> Send:
    """Frame writes shared by the main thread and the heartbeat thread."""
    lock = threading.Lock()

    def send(frame: Any) -> None:
        with lock:
            chan.write(frame)

    return send


def _heartbeat(send: Send) -> None:
    # Runs only while this process is alive and its interpreter runs: a process frozen in C code holding the
    # GIL, or stopped, goes silent, and the pool's watchdog replaces it.
    while True:
        time.sleep(protocol.HEARTBEAT_EVERY)
        try:
            send(protocol.heartbeat())
        except OSError:
            return


def _on_sticky(send: Send) -> Callable[[str, str], None]:
    def report(error: str, text: str) -> None:
        try:
            send(protocol.poisoned(error, text[-8000:]))
        finally:
            os._exit(protocol.EXIT_POISONED)  # no cleanup, no result: the CUDA context can no longer be trusted

    return report


def _prepare(spec: protocol.StartSpec, send: Send) -> DeviceContext:
    """Signals, ``sys.path``, injected faults and the process name; the context."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the worker's to handle (warm shutdown)
    signal.signal(signal.SIGUSR1, _on_soft_limit)
    # (PR_SET_PDEATHSIG was set before any import, by the command line that started us: wire/launch.py)
    sys.path[:] = spec.app.sys_path
    device = spec.device
    injected = faults.activate(device.kind, device.index)
    if injected is not None and injected.fail_start:
        os._exit(protocol.EXIT_FAULT_START)
    # Celery's log format names the process, as prefork's children: here host, device and slot
    # ("[...: INFO/celery@gpu-3/cuda:1#0] Task proj.embed[<id>] succeeded"), so merged logs stay attributable.
    multiprocessing.current_process().name = f"{spec.app.hostname}/{device.label}#{spec.slot}"
    return context.install(DeviceContext(faults=injected, on_sticky=_on_sticky(send), meter=cost.meter_for(device)))


def _start(ctx: DeviceContext, spec: protocol.StartSpec, send: Send) -> Any:
    """Import the app and run its setup hooks; the app. A failure is reported and ends the process."""
    from celery import signals

    started = time.monotonic()
    try:
        app = import_app(spec.app.app, spec.app.modules)
        _setup_logging(app, spec.app.loglevel, spec.app.logfile)
        if spec.threads and "torch" in sys.modules:  # the CPU device's thread budget (its variables are set
            sys.modules["torch"].set_num_threads(spec.threads)  # already, for a torch imported later)
        set_current(spec.device)
        tracing.brief_array_reprs()
        signals.worker_process_init.send(sender=None)
        record = record_of(app)
        for hook in record.setup_hooks if record is not None else ():
            hook(spec.device)
        if Settings.from_app(app.conf).cost_in_result:
            cost.record_in_results(app.backend, lambda: ctx.item_cost)
        if record is not None and record.model_specs:
            ctx.models = ModelCache(record.model_specs, spec.device, f"{spec.device.label}#{spec.slot}")
    except BaseException as exc:
        send(protocol.setup_failed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        os._exit(protocol.EXIT_SETUP_FAILED)
    send(protocol.ready(os.getpid(), time.monotonic() - started, memory.in_use(ctx, spec.device.kind)))
    return app


def _serve(ctx: DeviceContext, app: Any, chan: Channel, send: Send, device: Device, hostname: str) -> None:
    """Run frames until ``stop`` or the end of the pipe."""
    while True:
        try:
            frame = chan.read()
        except EOFError:
            return
        kind = frame.get("t")
        if kind == "stop":
            return
        if kind == "cancel":
            continue  # came after its batch had already ended
        chan.trim()  # new work: the pool has read our last reply (a huge result's pages go back)
        reply: Any = run_batch(ctx, app, frame, hostname, chan) if kind == "batch" else run_task(ctx, app, frame,
                                                                                              hostname)
        reply["mem"] = memory.in_use(ctx, device.kind)  # the pool recycles a process whose memory grows too far
        if ctx.models is not None:  # what it holds now, so the pool's mirror follows
            protocol.add_models(reply, ctx.models.resident.items(), *ctx.models.take_events())
        send(reply)
        del reply
        del frame  # drop the frame's views of the landing buffer before the next read, so it is reused
        chan.trim_landing()  # unless it is huge: then it goes, not kept for good after one big body


def main() -> None:
    """Entry point of a device process."""
    from celery import signals

    spec = protocol.StartSpec.loads(os.environ.pop(protocol.SPEC_ENV))
    # landing=True: long bodies arrive as views of a reused private buffer (see frames.py), no page faults
    chan = Channel(socket.socket(fileno=spec.fd), spec.max_frame, landing=True)
    send = _sender(chan)
    ctx = _prepare(spec, send)
    app = _start(ctx, spec, send)
    threading.Thread(target=_heartbeat, args=(send,), name="celery-gpu-heartbeat", daemon=True).start()
    _serve(ctx, app, chan, send, spec.device, spec.app.hostname)
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    chan.close()
