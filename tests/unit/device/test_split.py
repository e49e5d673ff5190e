"""The call of a batched task's function in a device process: one call for the list, bisection on failure."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_gpu import GPU, BatchResultMismatch, RetryItem
from celery_gpu.device.context import DeviceContext
from celery_gpu.device.split import call_batch as _call_batch
from celery_gpu.tasks.batched import BatchRequest, resolve
from tests.unit.batched_tasks import make_task

_ctx = DeviceContext()


def call_batch(task: Any, items: list[Any], kwargs: dict[str, Any], requests: list[Any] | None = None) -> list[Any]:
    return _call_batch(_ctx, task, items, kwargs, requests)


def test_one_call_for_the_whole_list(gpu_app: tuple[Celery, GPU]) -> None:
    seen: list[list[int]] = []

    def double(items: list[int], k: int = 2) -> list[int]:
        seen.append(list(items))
        return [k * x for x in items]

    task = make_task(gpu_app[1], double)
    assert call_batch(task, [1, 2, 3], {"k": 3}) == [3, 6, 9]
    assert seen == [[1, 2, 3]]


def test_a_failing_call_is_bisected_to_the_bad_items_within_2n_minus_1_calls(gpu_app: tuple[Celery, GPU]) -> None:
    seen: list[list[str]] = []

    def picky(items: list[str]) -> list[str]:
        seen.append(list(items))
        if any(x.startswith("bad") for x in items):
            raise ValueError("bad in batch")
        return [x.upper() for x in items]

    task = make_task(gpu_app[1], picky)
    items = ["a", "b", "bad1", "c", "d", "e", "bad2", "f"]
    before = _ctx.calls
    out = call_batch(task, items, {})
    assert [o if isinstance(o, str) else type(o).__name__ for o in out] == [
        "A", "B", "ValueError", "C", "D", "E", "ValueError", "F"]
    assert len(seen) <= 2 * len(items) - 1
    assert _ctx.calls - before == len(seen)
    assert ["bad1"] in seen and ["bad2"] in seen


def test_every_item_failing_costs_at_most_2n_minus_1_calls(gpu_app: tuple[Celery, GPU]) -> None:
    count = [0]

    def broken(items: list[int]) -> list[int]:
        count[0] += 1
        raise RuntimeError("always")

    out = call_batch(make_task(gpu_app[1], broken), list(range(7)), {})
    assert all(isinstance(o, RuntimeError) for o in out) and len(out) == 7
    assert count[0] == 2 * 7 - 1


def test_wrong_length_fails_every_item_with_batch_result_mismatch(gpu_app: tuple[Celery, GPU]) -> None:
    def short(items: list[int]) -> list[int]:
        return items + [0]

    task = make_task(gpu_app[1], short)
    out = call_batch(task, [1, 2], {})
    assert all(isinstance(o, BatchResultMismatch) for o in out)
    assert "returned 3 results for 2 items" in str(out[0])


def test_soft_time_limit_is_not_split(gpu_app: tuple[Celery, GPU]) -> None:
    count = [0]

    def slow(items: list[int]) -> list[int]:
        count[0] += 1
        raise SoftTimeLimitExceeded()

    out = call_batch(make_task(gpu_app[1], slow), [1, 2, 3, 4], {})
    assert count[0] == 1 and all(isinstance(o, SoftTimeLimitExceeded) for o in out)


def test_per_item_exceptions_and_retries_pass_through(gpu_app: tuple[Celery, GPU]) -> None:
    retry = RetryItem(countdown=1)

    def mixed(items: list[int]) -> list[Any]:
        return [ValueError("x"), retry, 3]

    task = make_task(gpu_app[1], mixed)
    out = call_batch(task, [1, 2, 3], {})
    assert isinstance(out[0], ValueError) and out[1] is retry and out[2] == 3
    with pytest.raises(ValueError):
        resolve(task, out[0])
    assert resolve(task, 3) == 3


def test_bound_batched_task_sees_each_items_request(gpu_app: tuple[Celery, GPU]) -> None:
    got: list[Any] = []

    def bound(self: Any, items: list[int]) -> list[int]:
        got.append([r.id for r in self.request.batch])
        return items

    task = gpu_app[1].task(name="t.bound", batch=4, bind=True)(bound)
    assert call_batch(task, [1, 2], {}, [BatchRequest({"id": "a"}), BatchRequest({"id": "b"})]) == [1, 2]
    assert got == [["a", "b"]]


# -- self.retry() inside a call (issue 16) ----------------------------------------------------------------


def _requests(*retries: int) -> list[Any]:
    from celery_gpu.tasks.batched import BatchRequest

    return [BatchRequest({"id": f"id{i}", "retries": n}, called_directly=False) for i, n in enumerate(retries)]


def test_self_retry_in_a_call_retries_every_item_of_it_without_bisecting(gpu_app: tuple[Celery, GPU]) -> None:
    calls: list[list[int]] = []
    reason = KeyError("not yet")

    def bound(self: Any, items: list[int]) -> list[int]:
        calls.append(list(items))
        raise self.retry(exc=reason, countdown=3, max_retries=5, kwargs={"k": 1}, queue="later")

    task = gpu_app[1].task(name="t.retry_call", batch=4, bind=True)(bound)
    out = call_batch(task, [1, 2, 3], {}, _requests(0, 1, 2))
    assert calls == [[1, 2, 3]]  # one call: a retry is not a failure to bisect
    assert len(out) == 3 and all(isinstance(o, RetryItem) for o in out)
    item = out[0]
    assert (item.exc, item.countdown, item.max_retries, item.kwargs, item.options) == (reason, 3, 5, {"k": 1},
                                                                                        {"queue": "later"})
    assert task.request.id is None and not getattr(task.request, "in_batch_call", False)  # the call's request popped


def test_self_retry_throw_false_retries_the_call_and_discards_its_results(gpu_app: tuple[Celery, GPU]) -> None:
    from celery.exceptions import Retry

    got: list[Any] = []

    def bound(self: Any, items: list[int]) -> list[int]:
        got.append(self.retry(countdown=1, throw=False))
        return items

    task = gpu_app[1].task(name="t.retry_nothrow", batch=4, bind=True)(bound)
    out = call_batch(task, [1, 2], {}, _requests(0, 0))
    assert isinstance(got[0], Retry)
    assert all(isinstance(o, RetryItem) and o.countdown == 1 for o in out)


def test_self_retry_with_args_in_a_call_fails_its_items_by_name(gpu_app: tuple[Celery, GPU]) -> None:
    from celery_gpu import BatchArgumentError

    def bound(self: Any, items: list[int]) -> list[int]:
        raise self.retry(args=(1,))

    task = gpu_app[1].task(name="t.retry_args", batch=4, bind=True)(bound)
    out = call_batch(task, [1, 2], {}, _requests(0, 0))
    assert all(isinstance(o, BatchArgumentError) and "kwargs=" in str(o) for o in out)


def test_batch_requests_have_celerys_request_attributes(gpu_app: tuple[Celery, GPU]) -> None:
    got: list[Any] = []

    def bound(self: Any, items: list[int]) -> list[int]:
        got.extend((r.id, r.retries, r.eta, r["retries"], r.get("nope", "dflt")) for r in self.request.batch)
        return items

    task = gpu_app[1].task(name="t.attrs", batch=4, bind=True)(bound)
    assert call_batch(task, [1, 2], {}, _requests(0, 2)) == [1, 2]
    assert got == [("id0", 0, None, 0, "dflt"), ("id1", 2, None, 2, "dflt")]
    with pytest.raises(KeyError):
        _requests(0)[0]["no_such_field"]
