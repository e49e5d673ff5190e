"""``celery-gpu``: ``worker`` (a Celery worker on the GPU pool), ``status`` (the cluster's devices), ``demo``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


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
        from .worker import run as worker

        return worker(rest)
    if command == "status":
        from .status import run as status

        return status(rest)
    if command == "demo":
        from .demo import run

        return run(rest)
    parser.parse_args([command])  # prints the usage error
    return 2
