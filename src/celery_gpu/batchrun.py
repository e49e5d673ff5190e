"""A batch in a device process: decode each item, one call of the user's function per group, then each item
traced as its own Celery task (its result, retries, signals), with the results written in one round trip.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from typing import Any

from . import batch, devmem, guard
from .bulkstore import BulkStore
from .errors import FrameError
from .frames import Channel
from .tracing import decode, refuse, set_in_task, trace

__all__ = ["run_batch"]

# An item whose request has any of these keeps Celery's per-task result write: its callbacks, chord or
# group may read the result from the backend right after the write, so it cannot wait for the batch's flush.
_LINKED = ("callbacks", "errbacks", "chord", "group")


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


def run_batch(app: Any, msg: dict[str, Any], hostname: str, chan: Channel | None = None) -> dict[str, Any]:
    """Run a ``batch`` frame; return the ``batch_done`` frame (one outcome per item, in order).

    Items cancelled by the pool while the call ran (``cancel`` frames on ``chan``) are not traced: no result
    is stored for them and the pool reports them terminated.
    """
    items: list[dict[str, Any]] = msg["items"]
    done: list[dict[str, Any] | None] = [None] * len(items)
    decoded: list[tuple[int, Any, Any, Any, Any]] = []  # (index, task, args, kwargs, embed)
    groups: dict[str, list[int]] = {}
    calls_before = batch.calls[0]
    set_in_task(True)
    try:
        for i, item in enumerate(items):
            item.setdefault("name", msg["name"])
            try:
                task, args, kwargs, embed = decode(app, item)
                if not isinstance(getattr(task, "gpu_batch", None), batch.BatchOptions):
                    raise TypeError(f"task {task.name} is not a batched task")
                if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
                    raise TypeError("the body is not [args, kwargs, embed]")
            except Exception as exc:  # this item fails by name; the others run
                done[i] = refuse(app, item, exc)
                continue
            decoded.append((i, task, args, kwargs, embed))
            groups.setdefault(_group_key(kwargs), []).append(len(decoded) - 1)

        outcome_of: dict[int, Any] = {}
        elapsed: dict[int, float] = {}
        per_item_peak: int | None = None
        for members in groups.values():
            callable_members = []
            for m in members:
                i, task, args, kwargs, _ = decoded[m]
                try:
                    batch.item_of(task.name, args)
                except Exception as exc:
                    outcome_of[i] = exc
                    continue
                callable_members.append(m)
            if not callable_members:
                continue
            task, kwargs = decoded[callable_members[0]][1], decoded[callable_members[0]][3]
            started = time.monotonic()
            devmem.start_peak()
            results = batch.call_batch(task, [decoded[m][2][0] for m in callable_members], kwargs,
                                       [items[decoded[m][0]]["request"] for m in callable_members])
            took = time.monotonic() - started
            peak = devmem.peak()
            if peak is not None:
                per_item_peak = max(per_item_peak or 0, -(-peak // len(callable_members)))
            for m, result in zip(callable_members, results, strict=True):
                outcome_of[decoded[m][0]] = result
                elapsed[decoded[m][0]] = took

        cancelled = _cancelled(chan)
        with BulkStore(app.backend) as store:
            for i, task, args, kwargs, embed in decoded:
                if items[i]["uuid"] in cancelled:
                    done[i] = {"failed": True, "cancelled": True, "runtime": elapsed.get(i, 0.0),
                               "exc": {"type": "Terminated", "module": "billiard.exceptions",
                                       "message": "revoked with terminate while its batch ran"}}
                    continue
                batch.outcomes[items[i]["uuid"]] = outcome_of[i]
                linked = any((items[i]["request"].get(k) or (embed or {}).get(k)) for k in _LINKED)
                try:
                    with store.direct() if linked else nullcontext():
                        outcome = trace(app, task, items[i], args, kwargs, embed, hostname)
                finally:
                    batch.outcomes.pop(items[i]["uuid"], None)
                outcome["runtime"] = elapsed.get(i, 0.0) + float(outcome.get("runtime") or 0.0)
                done[i] = outcome
    finally:
        set_in_task(False)
        batch.outcomes.clear()
    splits, fit = guard.oom_stats()
    frame: dict[str, Any] = {"t": "batch_done", "job": msg["job"], "items": done,
                             "calls": batch.calls[0] - calls_before}
    if splits:
        frame.update(oom_splits=splits, fit=fit)  # the pool forms batches of at most `fit` items now
    if per_item_peak is not None:
        frame["peak_per_item"] = per_item_peak
    return frame
