"""The pool's state as plain data: the status snapshot (``inspect gpu``, the ``worker-gpu`` event, the metrics
exporter; its shape is :mod:`celery_gpu.observe.snapshot`) and what ``celery inspect stats`` shows."""

from __future__ import annotations

import time
from typing import Any, cast

from ..devices import Device
from ..observe.backlog import BacklogSampler
from ..observe.health import readiness
from ..observe.readings import Readings
from ..observe.snapshot import DeviceInfo, DeviceStatus, ScalingInfo, SlotStatus, Status, TaskScaling
from ..observe.telemetry import Telemetry
from .process import Slot
from .scheduler import Scheduler

__all__ = ["device_info", "stats", "status"]


def device_info(device: Device, slots: list[Slot], scheduler: Scheduler) -> DeviceInfo:
    """A device and its slots as ``inspect stats`` shows them."""
    return {
        "device": device.label, "name": device.name, "kind": device.kind, "total_memory": device.total_memory,
        "reserved_memory": scheduler.held(device), "failed": device.label in scheduler.quarantined,
        "slots": [s.info() for s in slots if s.device is device],
    }


def _device_status(device: Device, slots: list[Slot], scheduler: Scheduler, telemetry: Telemetry,
                   readings: Readings) -> DeviceStatus:
    mine = [s for s in slots if s.device is device]
    states = [cast(SlotStatus, {**s.info(), "restarts": telemetry.restarts[(device.label, s.index)]}) for s in mine]
    if scheduler.models.declared:
        for state, slot in zip(states, mine, strict=True):
            state["models"] = [name for name, _ in scheduler.models.slots[slot.label].items()] \
                if slot.label in scheduler.models.slots else []
    busy = sum(s.state == "busy" for s in mine)
    reserved = scheduler.held(device)  # declared by running work + held by the processes' models
    reading = readings.read(device, busy, len(mine), reserved)
    return {
        "device": device.label, "name": device.name, "kind": device.kind, "total_memory": device.total_memory,
        "reserved_memory": reserved, "slots": states,
        "quarantined": device.label in scheduler.quarantined, "reason": scheduler.quarantined.get(device.label),
        "readings": reading, "counters": telemetry.counters(device.label),
        "headroom": max(0, device.total_memory - max(reserved, reading["memory_used"] or 0)),
        "models": scheduler.models.info(device.label),
    }


def scaling(scheduler: Scheduler, telemetry: Telemetry, backlog: BacklogSampler | None) -> ScalingInfo:
    """The autoscaling signals: broker backlog per queue, and per task items waiting, batch fill, item memory."""
    waiting, fill, memory = scheduler.waiting(), telemetry.batch_fill(), scheduler.item_memory()
    tasks: dict[str, TaskScaling] = {
        name: {"waiting": waiting.get(name, 0), "batch_fill": fill.get(name), "item_memory": memory.get(name)}
        for name in sorted(set(waiting) | set(fill) | set(memory))
    }
    return {"queues": backlog.snapshot() if backlog is not None else {},
            "sampled_at": backlog.sampled_at if backlog is not None else 0.0, "tasks": tasks}


def status(hostname: str, devices: list[Device], slots: list[Slot], scheduler: Scheduler, telemetry: Telemetry,
           readings: Readings, consumer_ready: bool = True, backlog: BacklogSampler | None = None) -> Status:
    """The whole picture of a pool: readiness, devices with live readings, processes, counters, batching,
    histograms, costs and autoscaling signals."""
    snap: Status = {
        "hostname": hostname, "timestamp": time.time(), "ready": False, "waiting_for": [], "pending": len(scheduler),
        "devices": [_device_status(d, slots, scheduler, telemetry, readings) for d in devices],
        "batching": scheduler.batching(), "histograms": telemetry.histograms(), "memory": scheduler.book.info(),
        "costs": telemetry.costs(), "scaling": scaling(scheduler, telemetry, backlog),
        "expired": dict(sorted(telemetry.expired.items())),
    }
    snap["ready"], snap["waiting_for"] = readiness(snap, consumer_ready)
    return snap


def stats(devices: list[Device], slots: list[Slot], scheduler: Scheduler) -> dict[str, Any]:
    """What the pool adds to ``celery inspect stats`` (its ``pool`` section)."""
    return {
        "max-concurrency": len(slots),
        "processes": [s.pid for s in slots if s.proc is not None],
        "pending": len(scheduler),
        "batching": scheduler.batching(),
        "devices": [device_info(d, slots, scheduler) for d in devices],
        "memory": scheduler.book.info(),
    }
