"""Celery's worker flags that a GPU worker does otherwise: one warning each; a pool that cannot run GPU tasks is
refused at start (issue 16 item 6). The end-to-end check is tests/integration/test_start.py."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_gpu import GPU
from celery_gpu.worker import flags


@pytest.mark.parametrize(("argv", "value"), [
    (["worker", "-c", "4"], "4"), (["worker", "-c4"], "4"), (["worker", "--concurrency", "4"], "4"),
    (["worker", "--concurrency=4"], "4"), (["worker", "-c", "2", "-c", "5"], "5"), (["worker", "-l", "info"], None),
    (["worker", "--concurrency"], None),
])
def test_argv_option(argv: list[str], value: str | None) -> None:
    assert flags.argv_option(argv, "-c", "--concurrency") == value


class _Worker:
    def __init__(self, **options: Any) -> None:
        self.options = options
        self.concurrency = 8
        self.max_memory_per_child = None


@pytest.fixture
def app() -> Celery:
    app = Celery("flags", broker="memory://", set_as_current=False)
    gpu = GPU(app)

    @gpu.task(name="t.embed")
    def embed(x: int) -> int:
        return x

    app.conf.task_routes = {"t.io": {"queue": "io"}}

    @app.task(name="t.io")
    def io(x: int) -> int:
        return x

    return app


def test_each_overridden_flag_gets_one_warning_saying_what_is_used(app: Celery) -> None:
    flags.pending.clear()
    worker = _Worker(autoscale=[4, 1])
    worker.max_memory_per_child = 100000
    flags.review(worker, app, 2, 1, 2, argv=["celery", "worker", "-c", "4", "-P", "prefork"])
    text = "\n".join(flags.pending)
    assert len(flags.pending) == 4, flags.pending
    assert "-c 4 is not used" in text and "2 = 1 device(s) x 2 process(es) per device" in text
    assert "--autoscale 4,1 is not used" in text and "--per-gpu" in text
    assert "-P prefork is not used" in text and "--max-memory-per-child 100000 is not used" in text
    assert worker.concurrency == 2 and "autoscale" not in worker.options and worker.max_memory_per_child is None
    flags.emit()
    assert flags.pending == []


def test_no_warning_when_the_flags_agree_with_the_pool(app: Celery) -> None:
    flags.pending.clear()
    flags.review(_Worker(), app, 4, 2, 2, argv=["celery-gpu", "worker", "--concurrency", "4", "-P", "custom"])
    assert flags.pending == []


def test_a_pool_that_cannot_run_gpu_tasks_is_refused_where_gpu_tasks_are_routed(app: Celery) -> None:
    routed = flags.gpu_queues(app)  # (with the shared tasks of other apps of this process: Celery's shared=True)
    assert "t.embed" in routed["celery"] and not any("t.io" in tasks for tasks in routed.values())
    app.amqp.queues.select(["celery"])
    with pytest.raises(SystemExit) as refused:
        flags.refuse_foreign_pool(_Worker(), app, "threads")
    message = str(refused.value)
    assert "threads pool cannot run GPU tasks" in message and "'celery'" in message and "t.embed" in message
    assert "NotInDeviceProcess" in message


def test_a_pool_for_queues_without_gpu_tasks_is_allowed(app: Celery) -> None:
    app.amqp.queues.select(["io"])
    flags.refuse_foreign_pool(_Worker(), app, "gevent")  # no GPU task is routed to "io": nothing to refuse
