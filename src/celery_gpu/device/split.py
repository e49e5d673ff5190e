"""One call of a batched task's function on a list, split in halves when it fails, so one bad item cannot fail
its batch-mates (see :mod:`celery_gpu.tasks.batched` for what a batched task is)."""

from __future__ import annotations

from typing import Any

from ..errors import BatchResultMismatch
from ..tasks.batched import BatchCallRetry, BatchOptions, BatchRequest
from . import memory
from .context import DeviceContext, current
from .recovery import out_of_memory, triage

__all__ = ["call_alone", "call_batch"]


def call_batch(
    ctx: DeviceContext, task: Any, items: list[Any], kwargs: dict[str, Any], requests: list[Any] | None = None,
    *, _oom: bool = False,
) -> list[Any]:
    """Call the task's function on ``items``; one outcome per item (a result, an exception, a RetryItem).

    When the call raises, the batch is split in halves and each half called again, down to single items, so
    the good items still succeed and only the failing ones carry the exception: at most ``2n - 1`` calls.
    Out of memory is split the same way, after the allocator cache is freed; a single item that still does
    not fit is tried once more, then fails with :class:`~celery_gpu.errors.DeviceOutOfMemory`. A sticky CUDA
    error ends the device process (:func:`~celery_gpu.device.recovery.triage`): nothing computed there is
    reported. A soft time limit is not split: every item gets it. A result count that differs from the item
    count fails every item of that call with :class:`BatchResultMismatch`. ``self.retry()`` in the call
    (``requests`` given, ``bind=True``) retries every item of the call: each outcome is the call's ``RetryItem``.
    """
    from celery.exceptions import SoftTimeLimitExceeded

    opts: BatchOptions = task.gpu_batch
    request = None
    if requests is not None and opts.bind:
        task.push_request(batch=requests, called_directly=False, in_batch_call=True, batch_retry=None)
        request = task.request
    ctx.calls += 1
    kind = None
    try:
        with ctx.metered():
            ctx.on_call(len(items))
            out = opts.fn(task, items, **kwargs) if opts.bind else opts.fn(items, **kwargs)
            results = list(out)
    except SoftTimeLimitExceeded as exc:
        return [exc] * len(items)
    except BatchCallRetry as retry:  # raise self.retry(...): not a failure, nothing to bisect
        return [retry.item] * len(items)
    except Exception as exc:
        kind = triage(ctx, exc)  # a sticky error: in a device process, does not return
        if kind != "oom" and len(items) == 1:
            return [exc]
        if kind == "oom" and len(items) == 1 and _oom:  # alone, with a freed cache, twice: it does not fit
            return [out_of_memory(task.name, exc, item=True)]
    finally:
        if request is not None:
            task.pop_request()
    if request is not None and request.batch_retry is not None:  # self.retry(throw=False): the results go
        return [request.batch_retry] * len(items)
    if kind is not None:
        return _split(ctx, task, items, kwargs, requests, oom=_oom or kind == "oom", freed=kind == "oom")
    if _oom:
        ctx.note_fit(len(items))
    if len(results) != len(items):
        error = BatchResultMismatch(
            f"batched task {task.name} returned {len(results)} results for {len(items)} items; "
            "it must return exactly one result per item, in order"
        )
        return [error] * len(items)
    return results


def _split(ctx: DeviceContext, task: Any, items: list[Any], kwargs: dict[str, Any], requests: list[Any] | None,
           *, oom: bool, freed: bool) -> list[Any]:
    """After a failed call: each half called again (a single item after running out of memory: once more)."""
    if freed:
        memory.free_cached()
        ctx.note_split()
        if len(items) == 1:
            return call_batch(ctx, task, items, kwargs, requests, _oom=True)
    mid = len(items) // 2
    head = call_batch(ctx, task, items[:mid], kwargs, requests[:mid] if requests else None, _oom=oom)
    return head + call_batch(ctx, task, items[mid:], kwargs, requests[mid:] if requests else None, _oom=oom)


def call_alone(task: Any, items: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    """A batched task's call outside a batch (eager mode, a direct call), with this process's context; a function
    that takes the task sees ``self.request.batch`` (its one item's request) as in a worker."""
    bound = task.gpu_batch.bind
    requests = [BatchRequest(vars(task.request), args=list(items), kwargs=kwargs)] if bound else None
    return call_batch(current(), task, items, kwargs, requests)
