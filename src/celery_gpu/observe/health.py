"""Is the worker ready to take work? One answer for every reader: ``celery-gpu status --ready``, the ``/ready``
HTTP endpoint next to ``/metrics``, the ``ready`` field of ``celery inspect gpu``, and systemd's ``READY=1``.

Celery says a worker is ``ready`` (and it answers ``inspect ping``) once its consumer is connected, which can be
long before the ``@gpu.setup`` hooks of its device processes have loaded their models. A celery-gpu worker is
*ready* when its consumer has been ready and every device process of it takes work (``idle`` or ``busy``): none
starting, restarting, down, or on a failed device.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["TAKING_WORK", "Readiness", "notify_systemd", "readiness"]

logger = logging.getLogger("celery_gpu.pool")

#: Slot states of a device process that takes work.
TAKING_WORK = frozenset({"idle", "busy"})


class Readiness(NamedTuple):
    """Whether the worker is ready, and what it still waits for (empty when ready)."""

    ready: bool
    waiting_for: list[str]


def readiness(status: Mapping[str, Any] | None, consumer_ready: bool = True) -> Readiness:
    """The readiness of a worker from its status snapshot (read defensively: it may come from another version)."""
    if not isinstance(status, Mapping):
        return Readiness(False, ["the pool has not started"])
    waiting: list[str] = [] if consumer_ready else ["the worker's consumer is not connected to the broker yet"]
    slots = 0
    devices = status.get("devices")
    for device in devices if isinstance(devices, list) else ():
        if not isinstance(device, Mapping):
            continue
        label = str(device.get("device", "?"))
        if device.get("quarantined"):
            waiting.append(f"{label} failed: {device.get('reason') or 'no reason given'}")
            continue
        for slot in device.get("slots") or ():
            slots += 1
            state = slot.get("state") if isinstance(slot, Mapping) else None
            if state not in TAKING_WORK:
                waiting.append(f"{label}#{slot.get('slot') if isinstance(slot, Mapping) else '?'} {state}")
    if not slots and not waiting:
        waiting.append("no device processes")
    return Readiness(not waiting, waiting)


def notify_systemd(message: str) -> bool:
    """Send ``message`` (``READY=1``, ``STOPPING=1``...) to systemd's notification socket, when the worker runs
    under a ``Type=notify`` unit (``NOTIFY_SOCKET`` set); True if sent. Never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.warning("celery-gpu: could not notify systemd (%s): %s", message.splitlines()[0], exc)
        return False
    return True
