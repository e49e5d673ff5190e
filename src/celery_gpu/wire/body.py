"""What a Celery task body must be, checked on both sides of the pipe before anything runs it.

Celery's protocol 2 body is ``[args, kwargs, embed]``: a list of positional arguments, a dict of keyword
arguments (string keys), and ``embed`` (``None`` or a dict with string keys; its ``callbacks``, ``errbacks``
and ``chain`` are lists of signatures, its ``chord`` a signature). Celery checks none of it: a body of another
shape stops its worker (``Request.__init__``), breaks its request's context in the main process, or raises in
a device process outside Celery's tracer. The worker's main process checks the body it decodes (for a
claim-checked body, the skeleton) and the device process checks the body it runs; a body that fails either is
stored as a :class:`~celery_gpu.errors.MalformedTaskMessage` naming the problem.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SHAPE", "body_problem"]

#: How a task body must look, for messages that name the problem.
SHAPE = "a task body must be [args, kwargs, embed]"

_LISTS = ("callbacks", "errbacks", "chain")  # embed keys that hold lists of signatures


def _keys(what: str, value: dict[Any, Any]) -> str | None:
    for k in value:
        if not isinstance(k, str):
            return f"{what} has a key that is not a string: {k!r:.80}"
    return None


def body_problem(body: Any) -> str | None:
    """What is wrong with a decoded task body, in words; None when it is ``[args, kwargs, embed]``.

    Runs for every message in the worker's main process: plain type checks only (about 2 µs for a usual body on a
    loaded 2-core machine).
    """
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        kind = f"a list of {len(body)} items" if isinstance(body, (list, tuple)) else type(body).__name__
        return f"the body is {kind}; {SHAPE}"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)):
        return f"args is {type(args).__name__}, not a list; {SHAPE}"
    if not isinstance(kwargs, dict):
        return f"kwargs is {type(kwargs).__name__}, not a dict; {SHAPE}"
    if embed is None:
        return _keys("kwargs", kwargs) if kwargs else None
    if not isinstance(embed, dict):
        return f"embed is {type(embed).__name__}, not a dict or null; {SHAPE}"
    problem = (_keys("kwargs", kwargs) if kwargs else None) or _keys("embed", embed)
    if problem:
        return problem
    for key in _LISTS:
        value = embed.get(key)
        if value and (not isinstance(value, (list, tuple)) or any(not isinstance(s, dict) for s in value)):
            return f"embed {key} is not a list of signatures: {value!r:.80}"
    chord = embed.get("chord")
    if chord is not None and not isinstance(chord, dict):
        return f"embed chord is {type(chord).__name__}, not a signature"
    return None
