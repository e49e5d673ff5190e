"""The status snapshot of a worker's pool: one typed picture shared by its producer (the pool) and its readers
(``celery inspect gpu``, the ``worker-gpu`` event, the Prometheus exporter, ``celery-gpu status``).

Everything is JSON-friendly plain data. ``celery inspect stats`` shows a smaller form of the devices
(:class:`DeviceInfo`, without readings and counters).
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict

__all__ = [
    "BatchingInfo", "CostInfo", "Counters", "DeviceInfo", "DeviceStatus", "HistogramData", "Histograms",
    "MemoryInfo", "ModelInfo", "Reading", "ScalingInfo", "SlotInfo", "SlotStatus", "Status", "StatusSource", "Summary",
    "TaskScaling",
]


class Reading(TypedDict):
    """A live reading of a device; ``None`` where unknown, ``source`` says where it came from."""

    utilization: float | None  # 0..1
    memory_used: int | None
    memory_total: int | None
    temperature_c: float | None
    power_w: float | None
    source: str  # nvml | proc | simulated | none | error


class Counters(TypedDict):
    """What the pool counted on one device."""

    succeeded: int
    failed: int
    restarts: int
    oom_splits: int
    reruns: int
    leak_recycles: int
    sticky_errors: int


class _SlotInfo(TypedDict):
    slot: int
    pid: int | None
    state: str  # stopped | starting | idle | busy | recycling | down | failed
    task: str | None
    tasks_done: int
    cuda_visible_devices: str
    memory_in_use: int


class SlotInfo(_SlotInfo, total=False):
    """One device process as ``inspect stats`` shows it."""

    setup_error: str


class _SlotStatus(SlotInfo):
    restarts: int


class SlotStatus(_SlotStatus, total=False):
    """One device process in the status snapshot."""

    models: list[str]  # the models it holds, least recently used first (apps that declare models)


class DeviceInfo(TypedDict):
    """A device and its processes as ``inspect stats`` shows them."""

    device: str
    name: str
    kind: str
    total_memory: int
    reserved_memory: int
    failed: bool
    slots: list[SlotInfo]


class ModelInfo(TypedDict):
    """A model on one device: the bytes its processes hold now, and how often it was loaded and evicted there."""

    resident_bytes: int
    loads: int
    evictions: int


class DeviceStatus(TypedDict):
    """A device in the status snapshot: its processes, live readings and counters."""

    device: str
    name: str
    kind: str
    total_memory: int
    reserved_memory: int
    slots: list[SlotStatus]
    quarantined: bool
    reason: str | None
    readings: Reading
    counters: Counters
    headroom: int  # total memory minus the larger of what is reserved (declared) and what is in use (reading)
    models: dict[str, ModelInfo]  # declared models seen on this device


class BatchingInfo(TypedDict):
    """One batched task: batches run, items in them, calls made (bisection included), items waiting now."""

    batches: int
    items: int
    calls: int
    mean_batch: float
    waiting: int


class CostInfo(TypedDict):
    """What one task's items cost on the devices: items metered, their device time and energy (None: no
    device reported energy for them)."""

    items: int
    device_s: float
    energy_j: float | None


class TaskScaling(TypedDict):
    """Autoscaling signals of one task: items waiting in the pool, recent batch fill, device memory per item."""

    waiting: int
    batch_fill: float | None  # items ÷ batch over the last minute (batched tasks that ran then), else None
    item_memory: int | None  # bytes one item (a plain task: one call) needs: declared ÷ batch, or learned


class ScalingInfo(TypedDict):
    """Autoscaling signals of a worker: the broker backlog of its queues (None: unknown) and its tasks."""

    queues: dict[str, int | None]
    sampled_at: float  # when the backlog was sampled (0: never)
    tasks: dict[str, TaskScaling]


class HistogramData(TypedDict):
    """A Prometheus-style histogram: cumulative ``[[le, count], ..., ["+Inf", count]]``, a sum and a count."""

    buckets: list[list[Any]]
    sum: float
    count: int


class Histograms(TypedDict):
    queue_wait_seconds: dict[str, HistogramData]  # by device
    run_seconds: dict[str, HistogramData]  # by device
    batch_size: dict[str, HistogramData]  # by batched task


class MemoryInfo(TypedDict):
    """What the pool learned about memory: ``memory="auto"`` peaks, and batch caps after OOM splits."""

    learned_peaks: dict[str, int]
    batch_caps: dict[str, int]  # "task@device" -> items


class Summary(TypedDict):
    """The snapshot without histograms (the ``worker-gpu`` event)."""

    hostname: str
    timestamp: float
    ready: bool  # the consumer has connected and every device process takes work (observe/health.py)
    waiting_for: list[str]  # what it is not ready for ("cuda:0#1 starting"); empty when ready
    pending: int
    devices: list[DeviceStatus]
    batching: dict[str, BatchingInfo]
    memory: MemoryInfo
    costs: dict[str, CostInfo]  # by task name
    expired: dict[str, int]  # by task name: items whose deadline passed while they waited (ended REVOKED)
    scaling: ScalingInfo


class Status(Summary):
    """The whole snapshot (``celery inspect gpu``, the metrics exporter)."""

    histograms: Histograms


class StatusSource(Protocol):
    """What can give a snapshot (the pool, on its loop thread)."""

    def status(self) -> Status: ...
