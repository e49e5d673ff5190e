"""``celery-gpu worker``: a stock ``celery worker`` on the GPU pool, with ``--gpus``, ``--per-gpu``,
``--cpu-threads``, ``--metrics-port`` and ``--metrics-address``; every other argument goes to ``celery worker``
unchanged (flags the GPU pool does otherwise, such as ``-c``, get a warning at start)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..api import POOL
from ..devices import discover
from ..errors import DeviceSpecError

__all__ = ["run"]


def run(argv: list[str]) -> int:
    """Run the worker command; returns its exit status."""
    parser = argparse.ArgumentParser(
        prog="celery-gpu worker",
        description="Start a Celery worker whose tasks run in device-pinned processes. "
        "Arguments not listed here go to `celery worker` unchanged.",
    )
    parser.add_argument("-A", "--app", required=True, help="the Celery app, as for `celery -A`")
    parser.add_argument("--gpus", default=os.environ.get("CELERY_GPU_DEVICES", "all"),
                        help="all | cpu | 0,1 | fake:N[xMEM] (default: all, the CPU when there is no GPU)")
    parser.add_argument("--per-gpu", type=int, default=int(os.environ.get("CELERY_GPU_PER_DEVICE", "1")),
                        help="device processes per device (default 1)")
    parser.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                        help="CPU threads of each process on the CPU device (torch, OpenMP, MKL, OpenBLAS); "
                        "default: the cores divided among the CPU device's processes")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics (/metrics), readiness (/ready) and liveness (/health) on "
                        "this port; off by default")
    parser.add_argument("--metrics-address", default=None, metavar="ADDR",
                        help="the address that endpoint listens on (default 0.0.0.0, every interface; "
                        "127.0.0.1 for this host only)")
    args, rest = parser.parse_known_args(argv)
    try:
        slots = len(discover(args.gpus)) * args.per_gpu
    except DeviceSpecError as exc:
        parser.error(str(exc))
    if args.per_gpu < 1:
        parser.error("--per-gpu must be >= 1")
    os.environ["CELERY_GPU_DEVICES"] = args.gpus
    os.environ["CELERY_GPU_PER_DEVICE"] = str(args.per_gpu)
    if args.metrics_port is not None:
        if not 0 < args.metrics_port <= 65535:
            parser.error("--metrics-port must be 1..65535")
        os.environ["CELERY_GPU_METRICS_PORT"] = str(args.metrics_port)
    if args.metrics_address is not None:
        os.environ["CELERY_GPU_METRICS_ADDR"] = args.metrics_address
    if args.cpu_threads is not None:
        if args.cpu_threads < 0:
            parser.error("--cpu-threads must be >= 0 (0: the cores divided among the processes)")
        os.environ["CELERY_GPU_CPU_THREADS"] = str(args.cpu_threads)
    # Celery resolves `--pool custom` through this variable, so the pool is ours even for an app without GPU(app).
    os.environ["CELERY_CUSTOM_WORKER_POOL"] = POOL
    if not any(a == "-P" or a.startswith("--pool") for a in rest):
        rest = ["--pool", "custom", *rest]
    if not any(a == "-c" or a.startswith("--concurrency") for a in rest):
        rest = ["--concurrency", str(slots), *rest]
    from celery import signals
    from celery.bin.celery import main as celery_main

    devices = slots // args.per_gpu
    signals.worker_init.connect(lambda sender=None, **_: _review(sender, slots, devices, args.per_gpu), weak=False)

    sys.argv = ["celery", "-A", args.app, "worker", *rest]
    return int(celery_main() or 0)


def _review(worker: Any, slots: int, devices: int, per_gpu: int) -> None:
    """``worker_init`` for an app without ``GPU(app)`` (which reviews its own workers): the same warnings."""
    from ..api import GPU

    app = getattr(worker, "app", None)
    if app is None or GPU.of(app) is not None:
        return
    from celery.concurrency import get_implementation

    from ..worker import flags
    from ..worker.pool import GPUPool

    pool = getattr(worker, "pool_cls", None)
    cls = get_implementation(pool) if isinstance(pool, str) else pool
    if isinstance(cls, type) and issubclass(cls, GPUPool):
        flags.review(worker, app, slots, devices, per_gpu)
