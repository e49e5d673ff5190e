"""A batch in a device process: decode each item, one call of the user's function per group, then each item
traced as its own Celery task (its result, retries, signals), with the results written in one round trip.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..errors import FrameError
from ..tasks import batched
from ..wire import protocol
from ..wire.frames import Channel
from . import memory
from .context import DeviceContext
from .results import BatchResults
from .split import call_batch
from .tracing import decode, refuse, trace

__all__ = ["run_batch"]

# An item whose request has any of these keeps Celery's per-task result write: its callbacks, chord or
# group may read the result from the backend right after the write, so it cannot wait for the batch's flush.
_LINKED = ("callbacks", "errbacks", "chord", "group")
_TERMINATED = protocol.failure("Terminated", "billiard.exceptions", "revoked with terminate while its batch ran")


@dataclass
class _Decoded:
    index: int  # in the batch frame
    task: Any
    args: Any
    kwargs: dict[str, Any]
    embed: Any


@dataclass
class _Calls:
    """What the calls of a batch produced, by item index."""

    outcome: dict[int, Any] = field(default_factory=dict)
    elapsed: dict[int, float] = field(default_factory=dict)
    share: dict[int, tuple[float, float | None]] = field(default_factory=dict)  # its call's cost ÷ its items
    peak_per_item: int | None = None


def _group_key(kwargs: dict[str, Any]) -> str:
    try:
        return json.dumps(kwargs, sort_keys=True)
    except (TypeError, ValueError):
        return f"unique:{id(kwargs)}"  # not comparable as data: a group of its own


def _cancelled(chan: Channel | None) -> set[str]:
    """Ids in ``cancel`` frames the pool sent while the batch ran (revoke with terminate of single items)."""
    ids: set[str] = set()
    while chan is not None and chan.pending():
        msg = chan.read()
        if not isinstance(msg, dict) or msg.get("t") != "cancel":
            raise FrameError(f"unexpected frame during a batch: {msg!r:.100}")
        ids.update(str(u) for u in msg.get("uuids") or ())
    return ids


def _decode_all(ctx: DeviceContext, app: Any, frame: protocol.BatchFrame,
                done: list[protocol.Outcome | None]) -> list[list[_Decoded]]:
    """Every item decoded, in groups of equal keyword arguments; an item that cannot run fails alone (``done``)."""
    groups: dict[str, list[_Decoded]] = {}
    for i, item in enumerate(frame["items"]):
        try:
            task, args, kwargs, embed = decode(ctx, app, frame["name"], item)
            if not isinstance(getattr(task, "gpu_batch", None), batched.BatchOptions):
                raise TypeError(f"task {task.name} is not a batched task")
            if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
                raise TypeError("the body is not [args, kwargs, embed]")
        except Exception as exc:  # this item fails by name; the others run
            done[i] = refuse(app, frame["name"], item, exc)
            continue
        groups.setdefault(_group_key(kwargs), []).append(_Decoded(i, task, args, kwargs, embed))
    return list(groups.values())


def _prepare_model(ctx: DeviceContext, groups: list[list[_Decoded]], budget: int | None) -> Exception | None:
    """The batch's model loaded (or room made) before its calls; the error of a load that failed."""
    if ctx.models is None or not groups:
        return None
    try:
        ctx.models.prepare(getattr(groups[0][0].task, "gpu_model", None), budget)
    except Exception as exc:  # every item of the batch fails with it (a ModelLoadError names the model)
        return exc
    return None


def _call_groups(ctx: DeviceContext, groups: list[list[_Decoded]], items: list[protocol.Item],
                 budget: int | None = None) -> _Calls:
    """One call of the function per group (bisected on failure): each item's outcome and its call's time."""
    calls = _Calls()
    failed = _prepare_model(ctx, groups, budget)
    for members in groups:
        callable_members = []
        for d in members:
            try:
                batched.item_of(d.task.name, d.args)
                if failed is not None:
                    raise failed
            except Exception as exc:
                calls.outcome[d.index] = exc
                continue
            callable_members.append(d)
        if not callable_members:
            continue
        first = callable_members[0]
        started, mark = time.monotonic(), ctx.cost_mark()
        memory.start_peak(ctx)
        requests = [batched.BatchRequest(items[d.index]["request"], args=d.args, kwargs=d.kwargs,
                                         called_directly=False) for d in callable_members] \
            if first.task.gpu_batch.bind else None  # self.request.batch, for a function that takes the task
        results = call_batch(ctx, first.task, [d.args[0] for d in callable_members], first.kwargs, requests)
        took = time.monotonic() - started
        n = len(callable_members)
        seconds, joules = ctx.cost_since(mark)
        share = (seconds / n, None if joules is None else joules / n)
        peak = memory.peak(ctx)
        if peak is not None:
            calls.peak_per_item = max(calls.peak_per_item or 0, -(-peak // n))
        for d, result in zip(callable_members, results, strict=True):
            calls.outcome[d.index] = result
            calls.elapsed[d.index] = took
            calls.share[d.index] = share
    return calls


def _trace_all(ctx: DeviceContext, app: Any, groups: list[list[_Decoded]], items: list[protocol.Item],
               calls: _Calls, cancelled: set[str], hostname: str, done: list[protocol.Outcome | None]) -> None:
    """Each decoded item traced as its own task with its outcome; the results written in one round trip."""
    with BatchResults(app.backend) as store:
        for d in sorted((d for members in groups for d in members), key=lambda d: d.index):
            item = items[d.index]
            took = calls.elapsed.get(d.index, 0.0)
            if item["uuid"] in cancelled:
                done[d.index] = {"failed": True, "cancelled": True, "runtime": took, "exc": _TERMINATED}
                continue
            batched.outcomes[item["uuid"]] = calls.outcome[d.index]
            ctx.item_cost = calls.share.get(d.index)
            linked = any((item["request"].get(k) or (d.embed or {}).get(k)) for k in _LINKED)
            try:
                with store.direct() if linked else nullcontext():
                    done[d.index] = trace(ctx, app, d.task, item, d.args, d.kwargs, d.embed, hostname, took)
            finally:
                batched.outcomes.pop(item["uuid"], None)
                ctx.item_cost = None


def run_batch(ctx: DeviceContext, app: Any, frame: protocol.BatchFrame, hostname: str,
              chan: Channel | None = None) -> protocol.BatchDoneFrame:
    """Run a ``batch`` frame; return the ``batch_done`` frame (one outcome per item, in order; ``mem`` is the
    caller's to fill).

    Items cancelled by the pool while the call ran (``cancel`` frames on ``chan``) are not traced: no result
    is stored for them and the pool reports them terminated.
    """
    items = frame["items"]
    done: list[protocol.Outcome | None] = [None] * len(items)
    calls_before = ctx.calls
    ctx.in_task = True
    try:
        groups = _decode_all(ctx, app, frame, done)
        calls = _call_groups(ctx, groups, items, frame.get("budget"))
        _trace_all(ctx, app, groups, items, calls, _cancelled(chan), hostname, done)
    finally:
        ctx.in_task = False
        batched.outcomes.clear()
    outcomes = [o for o in done if o is not None]
    assert len(outcomes) == len(items), "every item is refused, cancelled or traced"
    splits, fit = ctx.take_oom_stats()
    return protocol.batch_done(frame["job"], outcomes, ctx.calls - calls_before, 0, calls.peak_per_item, splits, fit,
                               ctx.take_cost())
