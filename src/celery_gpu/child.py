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
import time
import traceback
from types import FrameType
from typing import Any

from .batchrun import run_batch
from .frames import Channel
from .imports import import_app
from .tracing import decode, in_task, refuse, set_in_task, trace

#: Environment variable carrying the JSON start-up description of a device process.
SPEC_ENV = "CELERY_GPU_SLOT"

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
    try:
        try:
            task, args, kwargs, embed = decode(app, msg)
        except Exception as exc:  # fails the task by name, never the process
            outcome = refuse(app, msg, exc)
        else:
            outcome = trace(app, task, msg, args, kwargs, embed, hostname)
    finally:
        set_in_task(False)
    return {"t": "done", "job": msg["job"], **outcome}


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
        chan.write({"t": "setup_failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        os._exit(3)
    chan.write({"t": "ready", "pid": os.getpid(), "setup_s": time.monotonic() - started})
    while True:
        try:
            msg = chan.read()
        except EOFError:
            break
        if msg.get("t") == "stop":
            break
        if msg.get("t") == "cancel":
            continue  # came after its batch had already ended
        if msg.get("t") == "batch":
            chan.write(run_batch(app, msg, hostname, chan))
        else:
            chan.write(run_task(app, msg, hostname))
        del msg  # drop the frame's views of the landing buffer before the next read, so it is reused
    signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
    chan.close()


if __name__ == "__main__":
    main()
