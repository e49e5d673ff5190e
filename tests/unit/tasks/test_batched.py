"""What a batched task is: one item per call, its options, RetryItem, and the one-item call outside a worker."""

from __future__ import annotations

import pytest
from celery import Celery
from celery.exceptions import Retry

from celery_gpu import GPU, BatchArgumentError, RetryItem
from celery_gpu.tasks.batched import BatchOptions, item_of, resolve
from tests.unit.batched_tasks import make_task


def test_retry_item_becomes_a_celery_retry(gpu_app: tuple[Celery, GPU]) -> None:
    def same(items: list[int]) -> list[int]:
        return items

    task = make_task(gpu_app[1], same, max_retries=3)
    task.push_request(id="abc", retries=0, called_directly=False, delivery_info={}, is_eager=True)
    try:
        with pytest.raises(Retry):
            resolve(task, RetryItem(exc=KeyError("k"), countdown=0.5))
    finally:
        task.pop_request()


def test_one_item_per_call() -> None:
    assert item_of("t", [5]) == 5
    with pytest.raises(BatchArgumentError, match="exactly one positional argument"):
        item_of("t", [1, 2])
    with pytest.raises(BatchArgumentError):
        item_of("t", [])


@pytest.mark.parametrize("size,wait", [(0, 0.005), (-1, 0.0), (4, -0.001)])
def test_batch_options_are_checked(size: int, wait: float) -> None:
    with pytest.raises(ValueError):
        BatchOptions(size, wait, lambda items: items, False)


def test_outside_a_worker_the_function_gets_a_one_item_list(gpu_app: tuple[Celery, GPU]) -> None:
    seen: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        seen.append(list(items))
        return [2 * x for x in items]

    task = make_task(gpu_app[1], double)
    assert task(4) == 8
    assert task.apply(args=(5,)).get() == 10
    assert seen == [[4], [5]]
    assert task.gpu_batch.size == 8


def test_outside_a_worker_self_retry_and_request_batch_behave_as_in_one(gpu_app: tuple[Celery, GPU]) -> None:
    """Eager mode (``apply``): ``self.request.batch`` holds the item's request and ``self.retry()`` retries it as
    Celery's eager retry does, up to ``max_retries``, then raises ``exc``."""
    seen: list[tuple[list[str], int]] = []

    def flaky(self: object, items: list[str]) -> list[str]:
        seen.append((list(items), self.request.batch[0].retries))  # type: ignore[attr-defined]
        raise self.retry(exc=KeyError("not yet"))  # type: ignore[attr-defined]

    task = gpu_app[1].task(name="t.eager_retry", batch=4, bind=True, max_retries=2, default_retry_delay=0)(flaky)
    result = task.apply(args=("a",))
    assert result.state == "FAILURE" and isinstance(result.result, KeyError)
    assert seen == [(["a"], 0), (["a"], 1), (["a"], 2)]
