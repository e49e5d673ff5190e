"""The producer side of GPU tasks: ``task.submit_many(items)`` publishes many tasks in one go, and messages
use the arrays serializer by default.

Unlike Celery's ``task.map`` (one task over a list), every item becomes its own task (its own id and result),
so a batched task's worker can coalesce them. The messages are published through one producer connection,
and on Redis through kombu's publish batch (one pipeline per ``chunk`` messages) when kombu has it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

from celery.result import ResultSet

__all__ = ["SUBMIT_OPTIONS", "GPUTaskMixin", "ItemResults", "with_mixin"]

_classes: dict[type, type] = {}

#: The options :meth:`GPUTaskMixin.submit_many` passes to each ``apply_async``: Celery's ``Task.apply_async`` and
#: ``app.send_task`` options and kombu's ``publish`` options and message properties. Anything else is refused,
#: because Celery would send it silently as a message property: a task's own keyword argument
#: (``submit_many(items, scale=3.0)``) belongs in ``kwargs=``. Add here an option a later version learns.
SUBMIT_OPTIONS = frozenset({
    # Celery: when, where, how the task runs and what follows it
    "countdown", "eta", "expires", "queue", "exchange", "exchange_type", "routing_key", "priority", "route_name",
    "router", "link", "link_error", "shadow", "ignore_result", "time_limit", "soft_time_limit", "add_to_parent",
    "group_id", "group_index", "chord", "chain", "root_id", "parent_id", "reply_to", "retries",
    "replaced_task_nesting", "task_type", "result_cls", "argsrepr", "kwargsrepr", "stamped_headers", "stamps",
    "connection", "publisher",
    # kombu: how the message is published
    "serializer", "compression", "headers", "retry", "retry_policy", "declare", "delivery_mode", "mandatory",
    "immediate", "expiration", "timeout", "confirm_timeout", "correlation_id", "content_type", "content_encoding",
    "user_id", "app_id",
})


class ItemResults(ResultSet):  # type: ignore[misc]
    """The results of :meth:`GPUTaskMixin.submit_many`: a Celery ``ResultSet`` that starts listening at once.

    On a Redis backend Celery's ``ResultSet.get`` first reads every result once and, when any is not ready yet,
    sleeps ``interval`` (0.5 s by default) before it listens for the rest: half a second added to every bulk
    submit that waits. Here that first read does not sleep; ``interval`` keeps its meaning for polling
    backends.
    """

    def _iter_meta(self, **kwargs: Any) -> Any:
        kwargs["interval"] = 0  # read what is ready, then listen (pushed results need no polling interval)
        return super()._iter_meta(**kwargs)


class GPUTaskMixin:
    """Adds :meth:`submit_many` to GPU tasks, and sends their messages with the arrays serializer
    (``celery-gpu-arrays``: numpy/torch/CuPy arrays as raw buffers, no pickle) unless the task was declared
    with a ``serializer`` or the app configures ``task_serializer`` explicitly."""

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        task: Any = self
        if "serializer" not in options and getattr(task, "gpu_default_serializer", False) \
                and not _configured(task.app, "task_serializer"):
            from ..payload.arrays import NAME

            options["serializer"] = NAME
        if "argsrepr" not in options and args:
            brief = _brief_values(args)
            if brief is not None:
                options["argsrepr"] = brief
        if "kwargsrepr" not in options and kwargs:
            brief = _brief_values(kwargs)
            if brief is not None:
                options["kwargsrepr"] = brief
        return super().apply_async(args, kwargs, **options)  # type: ignore[misc]

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
              eta: Any = None, countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Any:
        """Celery's ``Task.retry``; inside a batched task's call it retries every item of the call, each as its own
        Celery retry (see :mod:`celery_gpu.tasks.batched`)."""
        task: Any = self
        if getattr(task.request, "in_batch_call", False):
            from .batched import retry_call

            return retry_call(task, args, kwargs, exc, throw, eta, countdown, max_retries, options)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)  # type: ignore[misc]

    def submit_many(
        self, items: Iterable[Any], *, kwargs: dict[str, Any] | None = None, chunk: int = 1000, **options: Any,
    ) -> ItemResults:
        """Send one task per item (``task.apply_async((item,), kwargs, **options)``) in bulk.

        Args:
            items: the items; each becomes the single positional argument of one task.
            kwargs: keyword arguments shared by every task.
            chunk: messages per broker round trip where the transport batches publishes (Redis).
            **options: any ``apply_async`` option (``queue``, ``countdown``, ``priority``...; the list is
                :data:`SUBMIT_OPTIONS`, plus the stamps named in ``stamped_headers``).

        Raises:
            TypeError: an option ``apply_async`` does not know (a task's keyword argument goes in ``kwargs=``),
                or ``task_id`` (each item is a task of its own id).

        Returns:
            An :class:`ItemResults` (a Celery ``ResultSet``) of the tasks' results, in order: ``.get()`` waits
            for all, ``.results`` are the per-item ``AsyncResult``.
        """
        task: Any = self
        _check_options(task.name, options)
        results = []
        with task.app.producer_or_acquire(options.pop("producer", None)) as producer:
            batch = getattr(producer, "batch", None)
            for start_items in _chunks(items, chunk):
                with batch(max_size=chunk) if batch is not None else nullcontext():
                    for item in start_items:
                        results.append(task.apply_async((item,), kwargs or {}, producer=producer, **options))
        return ItemResults(results, app=task.app)


def _check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse what :meth:`GPUTaskMixin.submit_many` would otherwise send silently as a message property."""
    if "task_id" in options:
        raise TypeError(f"{name}.submit_many() got task_id=: each item is a task with an id of its own")
    stamps = options.get("stamped_headers") or ()
    unknown = sorted(k for k in options if k not in SUBMIT_OPTIONS and k != "producer" and k not in stamps)
    if unknown:
        shown = ", ".join(f"{k}={options[k]!r}" for k in unknown)
        raise TypeError(
            f"{name}.submit_many() got unknown option(s) {', '.join(map(repr, unknown))}: options go to "
            f"apply_async; keyword arguments of the task go in kwargs= (submit_many(items, kwargs=dict({shown})))"
        )


def _configured(app: Any, key: str) -> bool:
    """Whether the app's configuration sets ``key`` itself (not only Celery's default)."""
    app.conf.get(key)  # loads a pending configuration (values set before it was loaded included)
    maps: Any = getattr(app.conf, "maps", None)
    return bool(maps) and any(key in m for m in maps[:-1])


def _is_array(value: Any) -> bool:
    module = type(value).__module__
    return (module.startswith("numpy") and hasattr(value, "shape") and hasattr(value, "dtype")) or (
        module.startswith(("torch", "cupy")) and hasattr(value, "shape") and hasattr(value, "dtype"))


def brief_array(value: Any) -> str | None:
    """``<ndarray shape=(1, 512) dtype=float32>`` for a numpy/torch/CuPy array, else None: numpy's own repr of a
    1x512 array costs about 2.6 ms (it formats every element below a thousand)."""
    if not _is_array(value):
        return None
    return f"<{type(value).__name__} shape={tuple(value.shape)} dtype={value.dtype}>"


_LONG = 16  # a list or tuple argument longer than this is shown by its first items and its length


def _is_long(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > _LONG


def _brief_values(values: Any) -> str | None:
    """A short ``argsrepr``/``kwargsrepr`` when a top-level value is an array (named by shape and dtype) or a
    long list (its first items and length): Celery's own repr of those costs more than the rest of the publish
    (numpy prints every element of an array below a thousand). None to let Celery write its own."""
    items = list(values.items()) if isinstance(values, dict) else list(enumerate(values))
    if not any(_is_array(v) or _is_long(v) for _, v in items):
        return None
    from celery.utils.saferepr import saferepr

    def one(v: Any) -> str:
        brief = brief_array(v)
        if brief is not None:
            return brief
        if _is_long(v):
            return f"[{', '.join(repr(x)[:32] for x in v[:4])}, ... {len(v)} items]"
        return str(saferepr(v, maxlen=64))

    if isinstance(values, dict):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in items) + "}"
    inner = ", ".join(one(v) for _, v in items)
    return f"({inner},)" if len(items) == 1 else f"({inner})"


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def with_mixin(base: type) -> type:
    """``base`` with :class:`GPUTaskMixin` mixed in (one class per base)."""
    if issubclass(base, GPUTaskMixin):
        return base
    if base not in _classes:
        _classes[base] = type(base.__name__, (GPUTaskMixin, base), {"__module__": base.__module__})
    return _classes[base]
