"""``celery-gpu worker``: a stock ``celery worker`` on the GPU pool, with ``--gpus``, ``--per-gpu`` and
``--metrics-port``; every other argument goes to ``celery worker`` unchanged."""

from __future__ import annotations

import argparse
import os
import sys

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
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on this port (/metrics); off by default")
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
    # Celery resolves `--pool custom` through this variable, so the pool is ours even for an app without GPU(app).
    os.environ["CELERY_CUSTOM_WORKER_POOL"] = POOL
    if not any(a == "-P" or a.startswith("--pool") for a in rest):
        rest = ["--pool", "custom", *rest]
    if not any(a == "-c" or a.startswith("--concurrency") for a in rest):
        rest = ["--concurrency", str(slots), *rest]
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "-A", args.app, "worker", *rest]
    return int(celery_main() or 0)
