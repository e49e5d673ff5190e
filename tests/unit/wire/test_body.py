"""The task-body check both sides of the pipe run before anything uses a body (issue 17, item 4)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, chain, chord, group

from celery_gpu.wire.body import SHAPE, body_problem


def _bodies_celery_sends() -> list[Any]:
    """Real bodies of Celery's canvas, as its send_task builds them: a plain call, link/link_error, a chain, a
    chord's header, a group's members."""
    app = Celery("bodies", broker="memory://", backend="cache+memory://", set_as_current=False)
    sent: list[Any] = []
    app.amqp.send_task_message = lambda producer, name, message, **kw: sent.append(message.body)

    @app.task
    def add(x: int, y: int = 0) -> int:
        return x + y

    add.apply_async((1,), {"y": 2})
    add.apply_async((1,), link=add.s(2), link_error=add.s(3))
    chain(add.s(1), add.s(2), add.s(3)).apply_async()
    chord([add.s(1), add.s(2)], add.s()).apply_async()
    group(add.s(i) for i in range(2)).apply_async()
    assert len(sent) >= 7
    return sent


@pytest.mark.parametrize("body", [*_bodies_celery_sends(), [[], {}, None], ((1,), {"k": 2}, {})])
def test_bodies_celery_sends_pass(body: Any) -> None:
    assert body_problem(body) is None


@pytest.mark.parametrize(("body", "words"), [
    ([["x"], {}, "notadict"], "embed is str"),
    ([[1], "notadict", {}], "kwargs is str"),
    ([None, None, None], "args is NoneType"),
    ([[1], {}], "a list of 2 items"),
    ({"x": 1}, "the body is dict"),
    (b"raw bytes", "the body is bytes"),
    (None, "the body is NoneType"),
    ([[1], {1: 2}, {}], "kwargs has a key that is not a string"),
    ([[1], {}, {2: 3}], "embed has a key that is not a string"),
    ([[1], {}, {"callbacks": 5}], "embed callbacks is not a list of signatures"),
    ([[1], {}, {"errbacks": ["x"]}], "embed errbacks is not a list of signatures"),
    ([[1], {}, {"chain": {"task": "t"}}], "embed chain is not a list of signatures"),
    ([[1], {}, {"chord": "x"}], "embed chord is str, not a signature"),
])
def test_what_is_wrong_is_said(body: Any, words: str) -> None:
    problem = body_problem(body)
    assert problem is not None and words in problem, problem
    if "embed" not in words and "key" not in words:
        assert SHAPE in problem
