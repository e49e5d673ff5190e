"""The device process: ``python -m celery_gpu.child``, started by the pool with its device already pinned.

It imports the Celery app, runs the ``@gpu.setup`` hooks once, tells the pool it is ready, then runs one
task at a time with Celery's own tracer (results stored in the backend from here, as in prefork), and
answers each with one ``done`` frame. Everything on the pipe is a msgpack frame; nothing is unpickled.
"""

from __future__ import annotations

import ctypes
import json
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

from . import devmem, faults, guard
from .batchrun import run_batch
from .frames import Channel
from .imports import import_app
from .tracing import decode, in_task, refuse, set_in_task, trace

#: Environment variable carrying the JSON start-up description of a device process.
SPEC_ENV = "CELERY_GPU_SLOT"
#: Seconds between heartbeats (``hb`` frames) of a device process; the pool's watchdog reads them.
HEARTBEAT_EVERY = 1.0
#: Exit status of a device process that stopped itself after a sticky CUDA error.
EXIT_POISONED = 70
#: Exit status of a device process that failed to start by injected fault (``fail_start``).
EXIT_FAULT_START = 4


def _die_with_parent() -> None:
    # Linux: the kernel SIGKILLs us when the worker's main process dies, so no device process is orphaned.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:  # pragma: no cover
            pass


def _on_soft_limit(signum: int, frame: FrameType | None) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    if in_task():  # a late signal after the task ended must not break the next read of the pipe
        raise SoftTimeLimitExceeded()


def _setup_logging(app: Any, loglevel: int, logfile: str | None) -> None:
    """Log as the worker does: Celery's own setup (its format, the ``setup_logging`` signal, ``--logfile``)."""
    app.log.setup_logging_subsystem(loglevel=loglevel, logfile=logfile)
    if app.conf.worker_redirect_stdouts:
        app.log.redirect_stdouts(app.conf.worker_redirect_stdouts_level)


def run_task(app: Any, msg: dict[str, Any], hostname: str) -> dict[str, Any]:
    """Run one task message through Celery's tracer; return the ``done`` frame."""
    set_in_task(True)
    devmem.start_peak()
    try:
        try:
            task, args, kwargs, embed = decode(app, msg)
        except Exception as exc:  # fails the task by name, never the process
            outcome = refuse(app, msg, exc)
        else:
            outcome = trace(app, task, msg, args, kwargs, embed, hostname)
    finally:
        set_in_task(False)
    peak = devmem.peak()
    splits, _ = guard.oom_stats()
    return {"t": "done", "job": msg["job"], **outcome, **({"peak": peak} if peak is not None else {}),
            **({"oom_splits": splits} if splits else {})}


def _sender(chan: Channel) -> Callable[[dict[str, Any]], None]:
    """Frame writes shared by the main thread and the heartbeat thread."""
    lock = threading.Lock()

    def send(frame: dict[str, Any]) -> None:
        with lock:
            chan.write(frame)

    return send


def _heartbeat(send: Callable[[dict[str, Any]], None]) -> None:
    # Runs only while this process is alive and its interpreter runs: a process frozen in C code holding the
    # GIL, or stopped, goes silent, and the pool's watchdog replaces it.
    while True:
        time.sleep(HEARTBEAT_EVERY)
        try:
            send({"t": "hb"})
        except OSError:
            return


def _on_sticky(send: Callable[[dict[str, Any]], None]) -> Callable[[str, str], None]:
    def report(error: str, text: str) -> None:
        try:
            send({"t": "poisoned", "error": error, "traceback": text[-8000:]})
        finally:
            os._exit(EXIT_POISONED)  # no cleanup, no result: the CUDA context can no longer be trusted

    return report


def main() -> None:
    """Entry point of a device process."""
    from celery import signals

    from .api import GPU
    from .devices import Device, _set_current

    spec = json.loads(os.environ.pop(SPEC_ENV))
    # landing=True: long bodies arrive as views of a reused private buffer (see frames.py), no page faults
    chan = Channel(socket.socket(fileno=spec["fd"]), spec["max_frame"], landing=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the worker's to handle (warm shutdown)
    signal.signal(signal.SIGUSR1, _on_soft_limit)
    _die_with_parent()
    sys.path[:] = spec["sys_path"]
    device = Device.from_wire(spec["device"])
    hostname = spec["hostname"]
    send = _sender(chan)
    injected = faults.activate(device.kind, device.index)
    if injected is not None and injected.fail_start:
        os._exit(EXIT_FAULT_START)
    guard.install(_on_sticky(send))
    # Celery's log format names the process, as prefork's children: here host, device and slot
    # ("[...: INFO/celery@gpu-3/cuda:1#0] Task proj.embed[<id>] succeeded"), so merged logs stay attributable.
    multiprocessing.current_process().name = f"{hostname}/{device.label}#{spec['slot']}"
    started = time.monotonic()
    try:
        app = import_app(spec["app"], spec["modules"])
        _setup_logging(app, spec["loglevel"], spec.get("logfile"))
        _set_current(device)
        signals.worker_process_init.send(sender=None)
        gpu = GPU.of(app)
        for hook in gpu.setup_hooks if gpu else ():
            hook(device)
    except BaseException as exc:
        send({"t": "setup_failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        os._exit(3)
    send({"t": "ready", "pid": os.getpid(), "setup_s": time.monotonic() - started,
          "mem": devmem.in_use(device.kind)})
    threading.Thread(target=_heartbeat, args=(send,), name="celery-gpu-heartbeat", daemon=True).start()
    while True:
        try:
            msg = chan.read()
        except EOFError:
            break
        if msg.get("t") == "stop":
            break
        if msg.get("t") == "cancel":
            continue  # came after its batch had already ended
        done = run_batch(app, msg, hostname, chan) if msg.get("t") == "batch" else run_task(app, msg, hostname)
        done["mem"] = devmem.in_use(device.kind)  # the pool recycles a process whose memory grows too far
        send(done)
        del done
        del msg  # drop the frame's views of the landing buffer before the next read, so it is reused
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    chan.close()


if __name__ == "__main__":
    main()
