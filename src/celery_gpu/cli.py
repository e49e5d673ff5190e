"""``celery-gpu``: ``worker`` (a Celery worker on the GPU pool), ``status`` (the cluster's devices), ``demo``."""

from __future__ import annotations

import argparse
import os
import sys

from .devices import discover
from .errors import DeviceSpecError

__all__ = ["main"]


def _worker(argv: list[str]) -> int:
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
    os.environ["CELERY_CUSTOM_WORKER_POOL"] = "celery_gpu.pool:GPUPool"
    if not any(a == "-P" or a.startswith("--pool") for a in rest):
        rest = ["--pool", "custom", *rest]
    if not any(a == "-c" or a.startswith("--concurrency") for a in rest):
        rest = ["--concurrency", str(slots), *rest]
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "-A", args.app, "worker", *rest]
    return int(celery_main() or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``celery-gpu`` command."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="celery-gpu", description="Celery tasks on GPUs, properly.")
    parser.add_argument("command", choices=["worker", "status", "demo"],
                        help="worker: run a worker; status: every worker's devices; demo: the demo")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "worker":
        return _worker(rest)
    if command == "status":
        from .status import run as status

        return status(rest)
    if command == "demo":
        from .demo import run

        return run(rest)
    parser.parse_args([command])  # prints the usage error
    return 2


if __name__ == "__main__":
    sys.exit(main())
