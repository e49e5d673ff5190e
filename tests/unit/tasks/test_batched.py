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
