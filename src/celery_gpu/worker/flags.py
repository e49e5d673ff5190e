"""What Celery's worker command line asks for that a GPU worker does otherwise, said once at start.

On the GPU pool, the number of processes is devices × ``per_device``, so ``-c N``, ``--autoscale`` and
``--max-memory-per-child`` cannot apply, and ``-P prefork`` is turned into the GPU pool by Celery itself (the
app's ``worker_pool``). Each such flag gets one warning at start that says what is used instead and why
(:func:`review`, at ``worker_init``; logged by :func:`emit` once the worker's logging is set up).

A pool that cannot run GPU tasks (``-P threads``, ``solo``, ``eventlet``, ``gevent``, ``prefork`` named by
class...) is refused at start with a clear error when the worker consumes a queue that GPU tasks are routed to
(:func:`refuse_foreign_pool`): under it every GPU task would fail with ``NotInDeviceProcess``. Such a worker may
still serve the app's other queues (``-Q io -P gevent``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["argv_option", "emit", "gpu_queues", "pending", "refuse_foreign_pool", "review"]

logger = logging.getLogger("celery_gpu.pool")

#: Warnings made at ``worker_init``, logged by :func:`emit` when the pool starts (logging is set up by then).
pending: list[str] = []


def argv_option(argv: Sequence[str], short: str, long: str) -> str | None:
    """The value given to ``short``/``long`` on a command line (``-c 4``, ``-c4``, ``--concurrency 4``,
    ``--concurrency=4``); the last one wins, as with click. None when absent."""
    found = None
    for i, arg in enumerate(argv):
        if arg in (short, long):
            found = argv[i + 1] if i + 1 < len(argv) else None
        elif arg.startswith(long + "="):
            found = arg[len(long) + 1:]
        elif arg.startswith(short) and len(arg) > len(short) and not arg.startswith("--"):
            found = arg[len(short):]
    return found


def _explicit_concurrency(app: Any, argv: Sequence[str]) -> str | None:
    given = argv_option(argv, "-c", "--concurrency")
    if given is not None:
        return f"-c {given}"
    app.conf.get("worker_concurrency")  # loads a pending configuration
    maps: Any = getattr(app.conf, "maps", None)
    if maps and any("worker_concurrency" in m for m in maps[:-1]) and app.conf.worker_concurrency:
        return f"worker_concurrency={app.conf.worker_concurrency}"
    return None


def review(worker: Any, app: Any, slots: int, devices: int, per_device: int,
           argv: Sequence[str] | None = None) -> None:
    """At ``worker_init`` of a worker on the GPU pool: note a warning for each flag the pool does not use, make
    Celery size the worker to the pool (``slots``) and turn ``--autoscale`` off."""
    argv = sys.argv if argv is None else argv
    layout = f"{slots} = {devices} device(s) x {per_device} process(es) per device"
    concurrency = _explicit_concurrency(app, argv)
    if concurrency is not None and concurrency.split()[-1].split("=")[-1] != str(slots):
        pending.append(f"{concurrency} is not used: a GPU worker runs one process per device slot, {layout}; "
                       "set --per-gpu (gpu_per_device, CELERY_GPU_PER_DEVICE) to change it")
    options = getattr(worker, "options", None)
    autoscale = options.pop("autoscale", None) if isinstance(options, dict) else None
    if autoscale:
        shown = ",".join(map(str, autoscale)) if isinstance(autoscale, (list, tuple)) else autoscale
        pending.append(f"--autoscale {shown} is not used: device processes hold loaded models and are not "
                       f"started or stopped with the load; the pool keeps {layout}")
    pool = argv_option(argv, "-P", "--pool")
    if pool == "prefork":
        pending.append("-P prefork is not used: GPU(app) set worker_pool to the GPU pool, which Celery uses for "
                       "'prefork' (a forked child cannot use CUDA); the pool spawns device processes instead")
    if getattr(worker, "max_memory_per_child", None):
        pending.append(f"--max-memory-per-child {worker.max_memory_per_child} is not used: it measures host memory "
                       "of forked children; set gpu_recycle_memory (device memory) or --max-tasks-per-child")
        worker.max_memory_per_child = None
    worker.concurrency = slots


def emit() -> None:
    """Log the warnings :func:`review` made (once: they are cleared)."""
    while pending:
        logger.warning("celery-gpu: %s", pending.pop(0))


def gpu_queues(app: Any) -> dict[str, list[str]]:
    """GPU task names by the queue they are routed to (with no call arguments: the route of a plain ``delay``)."""
    found: dict[str, list[str]] = {}
    for name, task in sorted(app.tasks.items()):
        if not getattr(task, "gpu", False):
            continue
        try:
            route = app.amqp.router.route({}, name, (), {})
        except Exception:  # a router that needs the arguments: assume the default queue
            route = {}
        queue = route.get("queue") or app.conf.task_default_queue
        found.setdefault(str(getattr(queue, "name", queue)), []).append(name)
    return found


def refuse_foreign_pool(worker: Any, app: Any, pool: str) -> None:
    """At ``worker_init`` of a worker whose pool is not the GPU pool: exit with a clear error when it consumes a
    queue GPU tasks are routed to (under that pool each of them would fail with ``NotInDeviceProcess``)."""
    consumed = app.amqp.queues.consume_from
    names = set(consumed if consumed is not None else app.amqp.queues)
    clash = {queue: tasks for queue, tasks in gpu_queues(app).items() if queue in names}
    if not clash:
        return
    queue, tasks = next(iter(sorted(clash.items())))
    more = f" (and {len(tasks) - 3} more)" if len(tasks) > 3 else ""
    raise SystemExit(
        f"celery-gpu: the {pool} pool cannot run GPU tasks, and this worker consumes queue {queue!r}, where "
        f"{', '.join(tasks[:3])}{more} are routed: each would fail with NotInDeviceProcess. Start it on the GPU "
        "pool (leave out -P, or `celery-gpu worker`), or give it only queues without GPU tasks (-Q)."
    )
