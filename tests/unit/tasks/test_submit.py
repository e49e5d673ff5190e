"""The producer side of GPU tasks: submit_many, its result set, the arrays serializer by default."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_gpu import GPU
from tests.unit.batched_tasks import make_task

# -- the result set of submit_many ---------------------------------------------------------------------------


def test_submit_many_results_listen_without_sleeping_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's ResultSet reads the results once and sleeps ``interval`` (0.5 s) before it listens; ours not."""
    from celery_gpu.tasks.submit import ItemResults

    app = Celery("r", backend="cache+memory://", set_as_current=False)
    seen: list[Any] = []

    def get_many(ids: Any, **kw: Any) -> Any:
        seen.append((set(ids), kw["interval"], kw["max_iterations"]))
        return iter(())

    monkeypatch.setattr(app.backend, "get_many", get_many)
    results = ItemResults([app.AsyncResult("a")], app=app)
    list(results._iter_meta(interval=0.5))
    assert seen == [({"a"}, 0, 1)]


def test_submit_many_sends_one_task_per_item(gpu_app: tuple[Celery, GPU]) -> None:
    from celery_gpu.tasks.submit import ItemResults

    app, gpu = gpu_app
    app.conf.broker_url = "memory://"
    app.conf.result_backend = "cache+memory://"

    def double(items: list[int]) -> list[int]:
        return [2 * x for x in items]

    task = make_task(gpu, double)
    results = task.submit_many(range(5), chunk=2)
    assert isinstance(results, ItemResults) and len(results.results) == 5
    assert len({r.id for r in results.results}) == 5
    with pytest.raises(TypeError):  # Celery checks the call against the user's function
        task.submit_many([1], kwargs={"nope": 1})



def test_submit_many_refuses_an_option_apply_async_does_not_know(gpu_app: tuple[Celery, GPU],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``scale=3.0`` would reach the message as a property and the task would never see it (issue 16)."""
    app, gpu = gpu_app
    app.conf.broker_url = "memory://"
    app.conf.result_backend = "cache+memory://"

    def scaled(items: list[int], scale: float = 1.0) -> list[float]:
        return [scale * x for x in items]

    task = make_task(gpu, scaled)
    sent: list[tuple[Any, dict[str, Any]]] = []
    from celery.app.task import Task

    def apply_async(self: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        sent.append((kwargs, options))
        return app.AsyncResult(f"id-{len(sent)}")

    monkeypatch.setattr(Task, "apply_async", apply_async)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'scale'.*kwargs=dict\(scale=3.0\)"):
        task.submit_many([1, 2], scale=3.0)
    with pytest.raises(TypeError, match="task_id"):
        task.submit_many([1, 2], task_id="one-id")
    assert sent == []  # refused before anything was published
    task.submit_many([1], kwargs={"scale": 3.0}, queue="q", countdown=1, priority=3, stamped_headers=["tenant"],
                     tenant="acme")
    [(kwargs, options)] = sent
    assert kwargs == {"scale": 3.0}
    assert (options["queue"], options["countdown"], options["priority"], options["tenant"]) == ("q", 1, 3, "acme")


def test_every_known_submit_option_is_an_option_of_celery_or_kombu() -> None:
    """The list of known options names real parameters (a typo there would let a wrong option through)."""
    import inspect

    from celery.app.amqp import AMQP
    from celery.app.base import Celery as App
    from celery.app.task import Task
    from kombu.messaging import Producer

    from celery_gpu.tasks.submit import SUBMIT_OPTIONS

    named = set()
    for fn in (Task.apply_async, App.send_task, AMQP.as_task_v2, Producer.publish):
        named |= set(inspect.signature(fn).parameters)
    properties = {"correlation_id", "reply_to", "expiration", "user_id", "app_id", "content_type",
                  "content_encoding", "exchange_type", "queue", "stamps", "argsrepr", "kwargsrepr"}
    assert SUBMIT_OPTIONS - named - properties == set()

def test_gpu_tasks_send_arrays_with_the_arrays_serializer_and_a_short_argsrepr(gpu_app: tuple[Celery, GPU]) -> None:
    import numpy as np

    from celery_gpu.payload import arrays

    app, gpu = gpu_app
    app.conf.broker_url = "memory://"
    app.conf.result_backend = "cache+memory://"
    sent: list[dict[str, Any]] = []

    @gpu.task(name="t.embed")
    def embed(x: Any, scale: float = 1.0) -> float:
        return 0.0

    @gpu.task(name="t.json", serializer="json")
    def as_json(x: Any) -> float:
        return 0.0

    from celery.app.task import Task

    original = Task.apply_async
    Task.apply_async = lambda self, args=None, kwargs=None, **options: sent.append(  # type: ignore[method-assign]
        {"args": args, "kwargs": kwargs, **options})
    try:
        embed.apply_async((np.zeros((2, 3), dtype="f4"),), {"scale": 2.0})
        embed.apply_async(([1.0, 2.0],))
        as_json.apply_async(([1.0],))
    finally:
        Task.apply_async = original  # type: ignore[method-assign]
    assert sent[0]["serializer"] == arrays.NAME
    assert sent[0]["argsrepr"] == "(<ndarray shape=(2, 3) dtype=float32>,)"
    assert "kwargsrepr" not in sent[0], "no array among the kwargs: Celery's own repr"
    assert sent[1]["serializer"] == arrays.NAME and "argsrepr" not in sent[1]
    assert "serializer" not in sent[2], "a task declared with a serializer keeps it"


def test_an_explicit_task_serializer_is_respected() -> None:
    from celery_gpu.tasks.submit import _configured

    fresh = Celery("fresh", set_as_current=False)
    assert not _configured(fresh, "task_serializer")
    fresh.conf.task_serializer = "msgpack"
    assert _configured(fresh, "task_serializer")
