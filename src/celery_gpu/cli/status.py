"""``celery-gpu status``: every worker's GPU devices in one table, asked through the broker.

The workers answer the ``gpu`` remote-control command with a JSON-friendly snapshot (devices, readings, slots,
counters, batching, histograms). :func:`fetch` broadcasts it, :func:`render` draws the answers for a terminal and
:func:`run` is the command line (``--json``, ``--watch``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ..observe.health import readiness
from ..units import GiB
from .autoscale import Advice, recommend

__all__ = ["Replies", "fetch", "render", "run"]

#: One worker's answer to the ``gpu`` command: a :class:`celery_gpu.observe.snapshot.Status` from a worker of this
#: version, but other workers may run other versions, so every field is read defensively here.
Snapshot = dict[str, Any]
#: Slot states that count as a process that is up (the others: stopped, starting, recycling, down, failed).
UP_STATES = frozenset({"idle", "busy"})
_HEADER = ("DEVICE", "NAME", "UTIL", "MEM GiB", "TEMP", "POWER", "PROCS", "BUSY", "DONE", "RESTARTS")
_INDENT = "  "
_MIN_NAME, _MAX_NAME = 4, 20
_CLEAR = "\x1b[H\x1b[2J"


class Replies(NamedTuple):
    """What the workers answered: celery-gpu snapshots, and everything else (workers without celery-gpu)."""

    #: nodename -> snapshot, for the workers that answered with one.
    workers: dict[str, Snapshot]
    #: nodename -> the reply as received (``{"error": "KeyError('gpu')"}`` from a worker without celery-gpu).
    others: dict[str, Any]


def _is_snapshot(reply: object) -> bool:
    return isinstance(reply, dict) and "error" not in reply and isinstance(reply.get("devices"), list)


def fetch(app: Any, timeout: float = 1.0, destination: Sequence[str] | None = None) -> Replies:
    """Ask every worker (or those in ``destination``) for its ``gpu`` snapshot; wait ``timeout`` seconds.

    Uses a plain broadcast, so neither the client nor the workers need more than Celery to take part.
    """
    answers = app.control.broadcast("gpu", reply=True, timeout=timeout,
                                    destination=list(destination) if destination else None)
    workers: dict[str, Snapshot] = {}
    others: dict[str, Any] = {}
    for answer in answers or ():
        for node, reply in (answer.items() if isinstance(answer, dict) else ()):
            if _is_snapshot(reply):
                workers[str(node)] = reply
            else:
                others[str(node)] = reply
    return Replies(dict(sorted(workers.items())), dict(sorted(others.items())))


# ---------------------------------------------------------------------------------------------------- rendering


def _num(value: object) -> float | None:
    """``value`` when it is a number (not a bool), else None: snapshots from other versions may hold anything."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: object, spec: str, suffix: str = "") -> str:
    number = _num(value)
    return "-" if number is None else f"{number:{spec}}{suffix}"


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, a ``~`` marking the cut."""
    if len(text) <= width:
        return text
    return text[: width - 1] + "~" if width > 1 else text[:width]


def _natural(label: str) -> list[Any]:
    """Sort key that puts ``cuda:2`` before ``cuda:10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", label)]


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _memory(device: Mapping[str, Any]) -> str:
    """``used/total`` GiB from the live reading, else ``reserved/total res`` from celery-gpu's own accounting."""
    readings = _dict(device.get("readings"))
    used, total = _num(readings.get("memory_used")), _num(readings.get("memory_total"))
    total = total if total is not None else _num(device.get("total_memory"))
    if used is not None:
        return f"{used / GiB:.1f}/{_fmt(total and total / GiB, '.1f')}"
    reserved = _num(device.get("reserved_memory"))
    if reserved is None and total is None:
        return "-"
    return f"{_fmt(reserved and reserved / GiB, '.1f')}/{_fmt(total and total / GiB, '.1f')} res"


def _short_name(name: object) -> str:
    text = str(name) if name else "-"
    return text[len("NVIDIA "):] if text.startswith("NVIDIA ") else text


def _device_cells(device: Mapping[str, Any]) -> list[str]:
    readings = _dict(device.get("readings"))
    slots = _dicts(device.get("slots"))
    counters = _dict(device.get("counters"))
    utilization = _num(readings.get("utilization"))
    done = sum(int(_num(counters.get(key)) or 0) for key in ("succeeded", "failed")) if counters else None
    restarts = _num(counters.get("restarts"))
    if restarts is None and slots:
        restarts = sum(_num(slot.get("restarts")) or 0 for slot in slots)
    up = sum(slot.get("state") in UP_STATES for slot in slots)
    busy = sum(slot.get("state") == "busy" for slot in slots)
    return [
        str(device.get("device", "?")),
        _short_name(device.get("name")),
        _fmt(None if utilization is None else utilization * 100, ".0f", "%"),
        _memory(device),
        _fmt(readings.get("temperature_c"), ".0f", "C"),
        _fmt(readings.get("power_w"), ".0f", "W"),
        f"{up}/{len(slots)}",
        str(busy),
        _fmt(done, ".0f"),
        _fmt(restarts, ".0f"),
    ]


def _columns(rows: Iterable[Sequence[str]], width: int) -> list[int]:
    """Column widths: each its widest cell, the name column shrunk (not below 4) to keep lines within ``width``."""
    widths = [len(cell) for cell in _HEADER]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    widths[1] = min(widths[1], _MAX_NAME)
    spare = width - (len(_INDENT) + sum(widths) + len(widths) - 1)
    if spare < 0:
        widths[1] = max(_MIN_NAME, widths[1] + spare)
    return widths


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    left = [_clip(cells[0], widths[0]).ljust(widths[0]), _clip(cells[1], widths[1]).ljust(widths[1])]
    right = [cell.rjust(w) for cell, w in zip(cells[2:], widths[2:], strict=True)]
    return (_INDENT + " ".join(left + right)).rstrip()


def _worker_lines(node: str, snapshot: Snapshot, widths: Sequence[int], width: int) -> list[str]:
    devices = sorted(_dicts(snapshot.get("devices")), key=lambda d: _natural(str(d.get("device", ""))))
    quarantined = sum(bool(d.get("quarantined")) for d in devices)
    ready, waiting = _worker_readiness(snapshot)
    lines = [f"{node}  {'ready' if ready else 'NOT READY'}  pending {_fmt(snapshot.get('pending'), '.0f')}  "
             f"devices {len(devices) - quarantined} up, {quarantined} quarantined"]
    if not ready:
        lines.append(f"{_INDENT * 2}waiting for: {'; '.join(waiting)}")
    if devices:
        lines.append(_row(_HEADER, widths))
    for device in devices:
        lines.append(_row(_device_cells(device), widths))
        if device.get("quarantined"):
            lines.append(f"{_INDENT * 2}QUARANTINED: {device.get('reason') or 'no reason given'}")
    batching = _dict(snapshot.get("batching"))
    lines.extend(_task_lines("batch", {task: f"  mean batch {_fmt(_dict(stats).get('mean_batch'), '6.1f')}"
                                             f"  waiting {_fmt(_dict(stats).get('waiting'), '4.0f')}"
                                       for task, stats in batching.items()}, width))
    lines.extend(_task_lines("cost ", {task: _cost_tail(_dict(cost))
                                       for task, cost in _dict(snapshot.get("costs")).items()}, width))
    return lines


def _cost_tail(cost: Mapping[str, Any]) -> str:
    """``  N items  X ms/item  Y J/item`` (``-`` where a figure is unknown)."""
    items = _num(cost.get("items")) or 0
    seconds, joules = _num(cost.get("device_s")), _num(cost.get("energy_j"))
    per_ms = seconds * 1000 / items if items and seconds is not None else None
    per_j = joules / items if items and joules is not None else None
    return f"  {items:6.0f} items {_fmt(per_ms, '.2f'):>8} ms/item {_fmt(per_j, '.2f'):>6} J/item"


def _task_lines(kind: str, tails: Mapping[Any, str], width: int) -> list[str]:
    """One line per task: ``kind``, the task's name (cut to fit ``width``) and its ``tails`` entry."""
    if not tails:
        return []
    room = width - len(_INDENT + kind + " ") - max(len(tail) for tail in tails.values())
    names = min(max(len(str(task)) for task in tails), max(room, _MIN_NAME))
    return [f"{_INDENT}{kind} {_clip(str(task), names).ljust(names)}{tails[task]}" for task in sorted(tails, key=str)]


#: What a worker without celery-gpu answers to the ``gpu`` command: kombu's pidbox reply to a command it has no
#: handler for (``{"error": "KeyError('gpu')"}``), or Celery's own "unknown command" words.
_UNKNOWN_COMMAND = ("KeyError('gpu')", 'KeyError("gpu")', "No such command", "Unknown command")


def _other(reply: object) -> str:
    if isinstance(reply, dict) and "error" in reply:
        if any(marker in str(reply["error"]) for marker in _UNKNOWN_COMMAND):
            return "not a celery-gpu worker (it does not know the gpu command)"
        return f"error {reply['error']}"
    return f"not a snapshot: {reply!r}"


def render(snapshots: Mapping[str, Snapshot], width: int = 80, *, others: Mapping[str, Any] | None = None,
           timeout: float = 1.0) -> str:
    """The cluster as text no wider than ``width``: per worker a header, its devices, its batched tasks.

    Workers are sorted by nodename, devices by label (``cuda:2`` before ``cuda:10``); ``-`` stands for a missing
    reading. ``others`` (workers that answered without a snapshot) are listed at the end; ``timeout`` only shows
    in the message for an empty cluster.
    """
    lines: list[str] = []
    if not snapshots:
        lines.append(f"no celery-gpu workers answered within {timeout:g}s")
    rows = [_device_cells(d) for s in snapshots.values() for d in _dicts(s.get("devices"))]
    widths = _columns(rows, width)
    for node in sorted(snapshots):
        if lines:
            lines.append("")
        lines.extend(_worker_lines(node, snapshots[node], widths, width))
    if any(row[3].endswith(" res") for row in rows):
        lines.extend(["", "res: memory reserved by celery-gpu, shown where there is no live reading"])
    if others:
        lines.extend(["", "answered without a celery-gpu status:"])
        lines.extend(f"{_INDENT}{node}: {_other(others[node])}" for node in sorted(others))
    return "\n".join(_clip(line, width) for line in lines)


# ---------------------------------------------------------------------------------------------------- command line


def _as_json(replies: Replies, advice: Advice | None = None) -> str:
    others = [{"node": node, "reply": reply} for node, reply in replies.others.items()]
    data: dict[str, Any] = {"workers": replies.workers, "others": others}
    if advice is not None:
        data["autoscale"] = advice
    return json.dumps(data, indent=2, default=repr)


def _advice(replies: Replies, args: argparse.Namespace) -> Advice | None:
    if args.autoscale is None:
        return None
    return recommend(replies.workers, args.autoscale, args.min_workers, args.max_workers)


def load_app(name: str) -> Any:
    """The Celery app named as for ``celery -A`` (``proj``, ``proj.celery``, ``proj:app``)."""
    from celery import Celery
    from celery.app.utils import find_app

    app = find_app(name)
    if not isinstance(app, Celery):
        raise TypeError(f"{name!r} is a {type(app).__name__}, not a Celery app")
    return app


def _frame(app: Any, args: argparse.Namespace) -> tuple[str, bool]:
    """One screenful and whether any celery-gpu worker answered; a broker that cannot be reached is said so."""
    from kombu.exceptions import OperationalError

    try:
        replies = fetch(app, timeout=args.timeout, destination=args.destination)
    except (OperationalError, OSError) as exc:
        message = f"cannot reach the broker: {exc}"
        return (json.dumps({"workers": {}, "others": [], "error": message}, indent=2) if args.json else message), False
    advice = _advice(replies, args)
    if args.json:
        return _as_json(replies, advice), bool(replies.workers)
    width = shutil.get_terminal_size((80, 24)).columns
    text = render(replies.workers, width, others=replies.others, timeout=args.timeout)
    if advice is not None:
        text += f"\n\nautoscale: {advice['current']} -> {advice['desired']} workers ({advice['reason']})"
    return text, bool(replies.workers)


def _worker_readiness(snapshot: Snapshot) -> tuple[bool, list[str]]:
    """The ``ready`` a worker reported, else (an older version) the same judgement made here from its slots."""
    if isinstance(snapshot.get("ready"), bool) and isinstance(snapshot.get("waiting_for"), list):
        return bool(snapshot["ready"]), [str(w) for w in snapshot["waiting_for"]]
    ready, waiting = readiness(snapshot)
    return ready, waiting


def _ready(app: Any, args: argparse.Namespace) -> int:
    """``--ready``: 0 when every named worker (else every worker that answered, at least one) is ready."""
    from kombu.exceptions import OperationalError

    try:
        replies = fetch(app, timeout=args.timeout, destination=args.destination)
    except (OperationalError, OSError) as exc:
        print(f"not ready: cannot reach the broker: {exc}")
        return 1
    verdicts: dict[str, tuple[bool, list[str]]] = {n: _worker_readiness(s) for n, s in replies.workers.items()}
    for node, reply in replies.others.items():
        verdicts[node] = (False, [_other(reply)])
    for node in args.destination or ():
        verdicts.setdefault(node, (False, [f"no answer within {args.timeout:g}s"]))
    if not verdicts:
        verdicts["(cluster)"] = (False, [f"no celery-gpu worker answered within {args.timeout:g}s"])
    if args.json:
        print(json.dumps({"ready": all(r for r, _ in verdicts.values()),
                          "workers": {n: {"ready": r, "waiting_for": w} for n, (r, w) in sorted(verdicts.items())}}))
    else:
        for node, (ok, waiting) in sorted(verdicts.items()):
            print(f"{node}: ready" if ok else f"{node}: not ready: {'; '.join(waiting)}")
    return 0 if all(ok for ok, _ in verdicts.values()) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-gpu status",
        description="Show every worker's GPU devices, asked through the broker with Celery remote control.",
    )
    parser.add_argument("-A", "--app", required=True, help="the Celery app, as for `celery -A`")
    parser.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl+C")
    parser.add_argument("--json", action="store_true", help="print the snapshots as JSON")
    parser.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS",
                        help="how long to wait for the workers' answers (default 1)")
    parser.add_argument("-d", "--destination", action="append", metavar="NODE",
                        help="ask only this worker (repeat, or comma-separate, for several)")
    parser.add_argument("--ready", action="store_true",
                        help="exit 0 only when every named worker (-d; else every worker that answers) is ready: "
                        "connected, and every device process idle or busy (a readiness probe)")
    parser.add_argument("--autoscale", type=int, default=None, metavar="ITEMS",
                        help="also say how many workers would keep at most ITEMS waiting items each "
                             "(broker backlog + pools; see docs/operations.md)")
    parser.add_argument("--min-workers", type=int, default=1, metavar="N", help="with --autoscale: at least N")
    parser.add_argument("--max-workers", type=int, default=1_000_000, metavar="N", help="with --autoscale: at most N")
    return parser


def run(argv: list[str]) -> int:
    """``celery-gpu status``: 0 when at least one celery-gpu worker answered, 1 when none (2: usage error);
    with ``--ready``, 0 only when every worker asked is ready."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0 or (args.watch is not None and args.watch <= 0):
        parser.error("--timeout and --watch take a number of seconds > 0")
    if args.ready and args.watch is not None:
        parser.error("--ready answers once; it does not take --watch")
    if args.autoscale is not None and (args.autoscale < 1 or not 0 <= args.min_workers <= args.max_workers):
        parser.error("--autoscale takes ITEMS >= 1, and 0 <= --min-workers <= --max-workers")
    if args.destination:
        args.destination = [node for item in args.destination for node in item.split(",") if node]
    try:
        app = load_app(args.app)
    except (ImportError, AttributeError, TypeError) as exc:
        parser.error(f"cannot load the app {args.app!r}: {exc}")
    if args.ready:
        return _ready(app, args)
    if args.watch is None:
        text, answered = _frame(app, args)
        print(text)
        return 0 if answered else 1
    try:
        while True:
            text, _ = _frame(app, args)
            if sys.stdout.isatty():
                sys.stdout.write(_CLEAR)
            if not args.json:  # each JSON frame stays one parseable document
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                text = f"celery-gpu status  {stamp}  every {args.watch:g}s, Ctrl+C to quit\n\n{text}"
            print(text, flush=True)
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
