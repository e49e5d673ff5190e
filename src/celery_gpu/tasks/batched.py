"""Batched tasks: what a batched task is, and how one call of the user's function serves many Celery tasks.

A batched task is declared with ``@gpu.task(batch=64)`` on a function of a *list*::

    @gpu.task(batch=64, max_wait_ms=5)
    def embed(texts: list[str], normalize: bool = False) -> list[list[float]]: ...

    embed.delay("hello")                    # one Celery task per item
    embed.delay("hi", normalize=True)

Mapping of calls to the list: each call passes exactly one positional argument, its *item*; the worker
collects items of the same task and calls the function once with the list of items. Keyword arguments are
not per item: items whose keyword arguments are equal are batched together and the function gets those
keyword arguments once (``embed(["hi", ...], normalize=True)``). The function returns one result per item,
in order; in an item's place it may return an exception instance (that item fails with it, or is retried if
the exception is in the task's ``autoretry_for``) or :class:`RetryItem` (that item alone is retried).

Retrying, two ways (``bind=True``)::

    @gpu.task(batch=64, bind=True, max_retries=3)
    def embed(self, texts):
        if not model_ready():
            raise self.retry(countdown=5)              # every item of this call, each its own Celery retry
        return [RetryItem(countdown=1) if t == "" else encode(t) for t in texts]   # only these items

``raise self.retry(...)`` inside the function retries each item of the call as its own Celery retry: its own
retry count against ``max_retries``, ``countdown``/``eta``, ``exc`` (raised for an item whose retries are spent),
``kwargs=`` and ``apply_async`` options, exactly as :class:`RetryItem` does for one item. With ``throw=False`` it
returns the ``Retry`` and the call's results are discarded (its items are retried). ``args=`` has no meaning for
a call of many items and is refused. ``self.request.batch`` is the list of the items' requests
(:class:`BatchRequest`: ``req.id``, ``req.retries``, ``req.eta``, ``req.headers``... as ``self.request`` is in a
plain task).

Each item keeps its own Celery task: its own id, result, events, ack and retries. Outside a worker (eager
mode, ``embed.apply(...)``, a direct ``embed("x")``) the function is called with a one-item list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from celery.app.task import Context

from ..errors import BatchArgumentError

__all__ = ["BatchCall", "BatchCallRetry", "BatchOptions", "BatchRequest", "RetryItem", "item_of", "item_runner",
           "outcomes", "resolve", "retry_call"]

#: Outcomes of the batch being traced in this device process, by task id: the device process's batch runner
#: (:mod:`celery_gpu.device.batch`) puts each item's outcome here before Celery's tracer runs that item.
outcomes: dict[str, Any] = {}
#: How a call of the function on a list is made: ``call(task, items, kwargs)`` → one outcome per item.
BatchCall = Callable[[Any, list[Any], dict[str, Any]], list[Any]]
_MISSING = object()


class RetryItem:
    """Return this in an item's place to retry that item alone, as ``self.retry(...)`` would for a task.

    Args:
        exc: the reason, shown in the result while it waits and raised once retries run out.
        countdown: seconds to wait before the retry (else the task's ``default_retry_delay``).
        eta: when to retry, instead of ``countdown``.
        max_retries: overrides the task's ``max_retries`` for this retry.
        kwargs: the keyword arguments of the retry (else the item's own).
        **options: ``apply_async`` options of the retry (``queue``, ``priority``...), as for ``self.retry``.
    """

    def __init__(
        self,
        exc: BaseException | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        max_retries: int | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.exc = exc
        self.countdown = countdown
        self.eta = eta
        self.max_retries = max_retries
        self.kwargs = kwargs
        self.options = options

    def __repr__(self) -> str:
        return f"RetryItem(exc={self.exc!r}, countdown={self.countdown!r})"


class BatchOptions:
    """How a batched task is batched; kept on the task as ``gpu_batch``.

    Attributes:
        size: the most items in one call.
        max_wait: seconds an item may be held back to fill a batch while other device processes are busy.
        fn: the user's function of a list.
        bind: whether ``fn`` takes the task as its first argument.
    """

    def __init__(self, size: int, max_wait: float, fn: Callable[..., Any], bind: bool) -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        if max_wait < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait * 1000}")
        self.size = size
        self.max_wait = max_wait
        self.fn = fn
        self.bind = bind


class BatchRequest(Context):  # type: ignore[misc]
    """One item's request in ``self.request.batch``: Celery's task request for that item (``req.id``,
    ``req.retries``, ``req.eta``, ``req.args``, ``req.headers``, ``req.get("x", default)``...), as ``self.request``
    is in a plain task. ``req["retries"]`` (the dicts of earlier versions) still reads the same fields."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


class BatchCallRetry(Exception):  # noqa: N818 - a signal to the batch runner, like Celery's Retry
    """``self.retry()`` was called inside a batched task's call: every item of the call is retried with ``item``.

    Raised out of the user's function and caught by the batch runner (never seen by Celery).
    """

    def __init__(self, item: RetryItem) -> None:
        super().__init__(item)
        self.item = item


def retry_call(task: Any, args: Any, kwargs: Any, exc: BaseException | None, throw: bool, eta: datetime | None,
               countdown: float | None, max_retries: int | None, options: dict[str, Any]) -> Any:
    """``task.retry(...)`` inside a batched task's call (see the module docstring): raises
    :class:`BatchCallRetry`; with ``throw=False`` records the retry on the call's request and returns a ``Retry``."""
    from celery.exceptions import Retry

    if args is not None:
        raise BatchArgumentError(
            f"self.retry(args=...) inside batched task {task.name}: each item of the call is retried with its own "
            "argument; pass kwargs= (shared keyword arguments) or return RetryItem for single items"
        )
    item = RetryItem(exc=exc, countdown=countdown, eta=eta, max_retries=max_retries, kwargs=kwargs, **options)
    if throw:
        raise BatchCallRetry(item)
    task.request.batch_retry = item
    return Retry(exc=exc, when=eta or countdown)


def item_of(name: str, args: Sequence[Any]) -> Any:
    """The item of one call: its single positional argument."""
    if len(args) != 1:
        raise BatchArgumentError(
            f"batched task {name} takes exactly one positional argument per call (its item), got {len(args)}; "
            "pass several values as one tuple or dict, and shared options as keyword arguments"
        )
    return args[0]


def resolve(task: Any, outcome: Any) -> Any:
    """Turn one item's outcome into what its Celery task returns or raises."""
    if isinstance(outcome, RetryItem):
        raise task.retry(kwargs=outcome.kwargs, exc=outcome.exc, countdown=outcome.countdown, eta=outcome.eta,
                         max_retries=outcome.max_retries, **outcome.options)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def item_runner(fn: Callable[..., Any], bind: bool, call: BatchCall) -> Callable[..., Any]:
    """The per-item ``run`` of a batched task (registered with ``bind=True``).

    In a device process it returns the outcome the batch call computed for this task id; anywhere else (eager
    mode, a direct call) it makes ``call`` on a one-item list.
    """

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        outcome = outcomes.pop(self.request.id, _MISSING) if self.request.id else _MISSING
        if outcome is _MISSING:
            outcome = call(self, [item_of(self.name, args)], kwargs)[0]
        return resolve(self, outcome)

    # Celery names the task and checks call signatures from these: make them the user's function's.
    for attr in ("__name__", "__qualname__", "__module__", "__doc__"):
        setattr(run, attr, getattr(fn, attr, None))
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1 if bind else 0:]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    run.__signature__ = sig.replace(parameters=[self_param, *params])  # type: ignore[attr-defined]
    return run
