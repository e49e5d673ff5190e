"""The task-message strategy of GPU tasks (Celery's default one, guarded, with acks in bulk), and a consumer
bootstep that guards every other task of a GPU worker and stores what Celery's consumer refuses.

Celery's worker decodes a task's body in ``Request.__init__`` and checks little of it: a body of valid JSON that
is not ``[args, kwargs, embed]`` raises there and stops the whole worker ("Unrecoverable error"); an ``embed``
that is not a dict breaks the request's context later (nothing stored, the client waits for ever); a message it
refuses (pickle, an unknown content type, bytes that do not decode, no task name) is logged and dropped with
nothing stored. The guard checks each body before Celery's strategy sees it
(:func:`~celery_gpu.wire.body.body_problem`) and turns a bad one into Celery's ``InvalidTaskError``; then the
message takes Celery's own way out (logged, and rejected or, for an undecodable body, acked). On that way, the
consumer's handlers — ``on_invalid_task``, ``on_decode_error``, ``on_unknown_message``, which
:class:`GuardStrategies` wraps — store a :class:`MalformedTaskMessage` saying what was wrong whenever the
message's headers name a task id (and send ``task-failed``, as Celery does for an unknown task).

With an event loop, acks go through an :class:`~celery_gpu.worker.consumer.acks.AckBuffer` shared by the consumer's GPU
tasks: one broker round trip per loop turn instead of one per task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.exceptions import InvalidTaskError
from celery.utils.collections import AttributeDict
from celery.worker.strategy import default
from kombu.exceptions import ContentDisallowed, DecodeError

from ...errors import MalformedTaskMessage
from ...wire.body import SHAPE, body_problem
from .acks import AckBuffer

__all__ = ["GuardStrategies", "gpu_strategy", "guard"]

logger = logging.getLogger("celery_gpu.strategy")

Handler = Callable[..., Any]
_REFUSED = (DecodeError, ContentDisallowed)  # Celery's consumer logs these and acks (rejects) the message itself


def gpu_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Handler:
    """Celery's default strategy, with malformed messages failed by name instead of stopping the worker, and
    acks in bulk."""
    handler = default(task, app, consumer, **kwargs)
    acks = _ack_buffer(consumer)

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        # After a reconnect Celery chains prefetch restoration onto its own ack: keep it until restored.
        if acks is not None and getattr(consumer, "_maximum_prefetch_restored", True):
            ack = acks.ack(message)
        return handler(message, body, ack, reject, callbacks, **kw)

    return guard(task, consumer, task_message_handler)


def guard(task: Any, consumer: Any, handler: Handler) -> Handler:
    """``handler`` (a task's strategy) behind the malformed-message check (see the module's docstring)."""

    def guarded(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        if body is None:  # protocol 2: the body is decoded here (kombu caches it for Celery's Request)
            try:
                payload = message.payload
            except _REFUSED:
                raise  # Celery's consumer logs it, and GuardStrategies stores it
            except Exception as exc:  # a serializer's own error: refused the same way, never a stopped worker
                raise InvalidTaskError(_malformed(task.name, message, f"its body cannot be decoded here: "
                                                                     f"{_cause(exc)}")) from exc
            # A protocol-1 body under protocol-2 headers (a dict with "args") is Celery's to convert.
            problem = None if isinstance(payload, dict) and "args" in payload else body_problem(payload)
            if problem is not None:
                raise InvalidTaskError(_malformed(task.name, message, problem))
        try:
            return handler(message, body, ack, reject, callbacks, **kw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidTaskError(_malformed(task.name, message, f"{_cause(exc)}; {SHAPE}")) from exc

    guarded.celery_gpu_guarded = True  # type: ignore[attr-defined]
    return guarded


class GuardStrategies(bootsteps.StartStopStep):  # type: ignore[misc]
    """Puts every task's strategy of a GPU worker behind :func:`guard` (GPU tasks' own strategy has it already):
    all of them run in device processes, and none may stop the worker or vanish for a malformed body. And wraps
    the consumer's handlers of refused messages so that each stores its failure (before Celery's task consumer
    and event loop take them, hence in ``__init__``)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)  # which (re)builds the strategies on every (re)start
    label = "celery-gpu malformed-message guard"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        if getattr(c, "_celery_gpu_stores_refused", False):
            return
        c._celery_gpu_stores_refused = True
        invalid, undecodable, unknown = c.on_invalid_task, c.on_decode_error, c.on_unknown_message

        def on_invalid_task(body: Any, message: Any, exc: BaseException) -> Any:
            _store(c, message, _as_text(message, exc))
            return invalid(body, message, exc)

        def on_decode_error(message: Any, exc: BaseException) -> Any:
            _store(c, message, _as_text(message, exc))
            return undecodable(message, exc)

        def on_unknown_message(body: Any, message: Any) -> Any:
            _store(c, message, _malformed(None, message, "its headers name no task"))
            return unknown(body, message)

        c.on_invalid_task, c.on_decode_error, c.on_unknown_message = on_invalid_task, on_decode_error, \
            on_unknown_message

    def start(self, c: Any) -> None:
        for name, handler in list(c.strategies.items()):
            if not getattr(handler, "celery_gpu_guarded", False) and name in c.app.tasks:
                c.strategies[name] = guard(c.app.tasks[name], c, handler)


def _cause(exc: BaseException) -> str:
    """``Type: message`` of an error; for kombu's ``DecodeError``, of the decoder's error it wraps."""
    inner = exc.args[0] if isinstance(exc, DecodeError) and exc.args else None
    if isinstance(inner, BaseException):
        return f"{type(exc).__name__} ({type(inner).__name__}: {inner})"
    return f"{type(exc).__name__}: {exc}"


def _headers(message: Any) -> dict[str, Any]:
    headers = getattr(message, "headers", None)
    return headers if isinstance(headers, dict) else {}


def _malformed(name: str | None, message: Any, problem: str) -> str:
    """The failure's text: which task, which id, what was wrong."""
    headers = _headers(message)
    return f"malformed message for task {name or headers.get('task')} (id {headers.get('id')}): {problem}"


def _as_text(message: Any, exc: BaseException) -> str:
    """The failure's text for an error raised on the way (the guard's own text, or Celery's refusal)."""
    text = str(exc)
    if isinstance(exc, InvalidTaskError) and text.startswith("malformed message for task "):
        return text
    if isinstance(exc, _REFUSED):
        ctype, encoding = getattr(message, "content_type", None), getattr(message, "content_encoding", None)
        return _malformed(None, message, f"its body ({ctype}, {encoding}) cannot be decoded here: {_cause(exc)}")
    return _malformed(None, message, _cause(exc))


def _store(consumer: Any, message: Any, text: str) -> None:
    """Store ``MalformedTaskMessage(text)`` as the result of the message's task, when its headers name one, and
    send ``task-failed``."""
    headers = _headers(message)
    task_id, name = headers.get("id"), headers.get("task")
    if not isinstance(task_id, str) or not task_id:
        return  # no id to store under: Celery's log line is all there is (a remote-control message, garbage)
    task = consumer.app.tasks.get(name) if isinstance(name, str) else None
    backend = task.backend if task is not None else consumer.app.backend
    properties = getattr(message, "properties", None)
    properties = properties if isinstance(properties, dict) else {}
    # As Celery's consumer does for an unknown task: no chord, no errbacks (the body that names them is bad).
    request = AttributeDict(id=task_id, name=name, chord=None, errbacks=None, root_id=headers.get("root_id"),
                            parent_id=headers.get("parent_id"), correlation_id=properties.get("correlation_id"),
                            reply_to=properties.get("reply_to"))
    try:
        backend.mark_as_failure(task_id, MalformedTaskMessage(text), request=request)
    except Exception:  # the backend may be down; the message is still discarded, and logged
        logger.exception("celery-gpu: could not store the failure of malformed task %s", task_id)
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is not None:
        try:
            dispatcher.send("task-failed", uuid=task_id, exception=f"MalformedTaskMessage({text!r})")
        except Exception:
            logger.exception("celery-gpu: could not send task-failed for malformed task %s", task_id)


def _ack_buffer(consumer: Any) -> AckBuffer | None:
    hub = getattr(consumer, "hub", None)
    if hub is None:
        return None  # no event loop: Celery's own acks
    acks: AckBuffer | None = getattr(consumer, "_celery_gpu_acks", None)
    if acks is None:
        acks = AckBuffer(hub.call_soon)
        consumer._celery_gpu_acks = acks
    return acks
