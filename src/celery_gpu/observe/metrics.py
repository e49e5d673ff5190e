"""Prometheus metrics of the GPU pool, exported from the pool's status snapshot.

The exporter never touches the pool: it reads a zero-argument callable that returns the pool's JSON-able
status snapshot (or None before the pool has started, when nothing is exported). ``prometheus-client`` is an
optional extra (``pip install 'celery-gpu[prometheus]'``) and is imported only when metrics are used.

Every metric has a ``host`` label (the Celery nodename). A null reading exports no sample.

=========================================  =========  ===================  =============================================
Metric                                     Type       Labels               Meaning
=========================================  =========  ===================  =============================================
celery_gpu_device_utilization_ratio        gauge      host, device         Utilization, 0..1
celery_gpu_device_memory_used_bytes        gauge      host, device         Memory in use on the device
celery_gpu_device_memory_total_bytes       gauge      host, device         Device memory (reading, else declared total)
celery_gpu_device_memory_reserved_bytes    gauge      host, device         Declared by running tasks + models
celery_gpu_device_temperature_celsius      gauge      host, device         Temperature
celery_gpu_device_power_watts              gauge      host, device         Power draw
celery_gpu_device_quarantined              gauge      host, device         1 when the device is marked failed
celery_gpu_device_info                     gauge      host, device, name,  Always 1; the device's name, kind
                                                      kind, source         (cuda|cpu|fake) and reading source
celery_gpu_slot_up                         gauge      host, device, slot   1 when the slot has a live process
celery_gpu_slot_busy                       gauge      host, device, slot   1 when the slot runs a task
celery_gpu_tasks_total                     counter    host, device,        Tasks finished on the device
                                                      outcome              (outcome: succeeded|failed)
celery_gpu_process_restarts_total          counter    host, device, slot   Restarts of the slot's process
celery_gpu_oom_splits_total                counter    host, device         Batches split after running out of memory
celery_gpu_task_reruns_total               counter    host, device         Tasks run again after their process died
celery_gpu_leak_recycles_total             counter    host, device         Processes replaced for holding too much
celery_gpu_sticky_errors_total             counter    host, device         Sticky CUDA errors (processes poisoned)
celery_gpu_worker_ready                    gauge      host                 1 when the worker is ready (``/ready``)
celery_gpu_pending_tasks                   gauge      host                 Tasks and batch items waiting in the pool
celery_gpu_batch_waiting_items             gauge      host, task           Items waiting for a batch
celery_gpu_batches_total                   counter    host, task           Batches run
celery_gpu_batch_items_total               counter    host, task           Items run in batches
celery_gpu_batch_calls_total               counter    host, task           Calls of the batch task
celery_gpu_device_memory_headroom_bytes    gauge      host, device         Total less max(reserved, in use)
celery_gpu_model_resident_bytes            gauge      host, device, model  Bytes a model holds on the device
celery_gpu_model_loads_total               counter    host, device, model  Loads of the model there
celery_gpu_model_evictions_total           counter    host, device, model  Evictions of it there (LRU by bytes)
celery_gpu_queue_backlog_messages          gauge      host, queue          Messages waiting in the broker
celery_gpu_waiting_items                   gauge      host, task           Items (and plain tasks) waiting in the pool
celery_gpu_batch_fill_ratio                gauge      host, task           Items ÷ batch over the last minute
celery_gpu_task_item_memory_bytes          gauge      host, task           Device memory one item needs
celery_gpu_expired_items_total             counter    host, task           Items ended REVOKED (expired) waiting
celery_gpu_device_seconds_total            counter    host, task           Device time of the task's calls
celery_gpu_energy_joules_total             counter    host, task           Their energy (NVML; simulated on fake)
celery_gpu_metered_items_total             counter    host, task           Items (or plain tasks) those calls served
celery_gpu_queue_wait_seconds              histogram  host, device         Wait in the pool before a task starts
celery_gpu_task_run_seconds                histogram  host, device         Run time of a task in its device process
celery_gpu_batch_size                      histogram  host, task           Items per batch
celery_gpu_snapshot_age_seconds            gauge      host                 Age of the snapshot when scraped
=========================================  =========  ===================  =============================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from .endpoint import Endpoint as MetricsExporter
from .endpoint import PortInUse as MetricsPortInUse
from .endpoint import Snapshot, start_endpoint
from .snapshot import CostInfo, DeviceStatus, HistogramData, ScalingInfo, Status

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["MetricsExporter", "MetricsPortInUse", "PoolCollector", "Snapshot", "metrics_app", "render",
           "start_exporter"]

logger = logging.getLogger("celery_gpu.metrics")


_MISSING = "the metrics port needs prometheus-client: pip install 'celery-gpu[prometheus]'"
_SLOT_DOWN = frozenset({"down", "failed"})
_READINGS = [  # (metric suffix, readings key, help)
    ("utilization_ratio", "utilization", "Utilization of the device, 0..1."),
    ("memory_used_bytes", "memory_used", "Memory in use on the device, in bytes."),
    ("temperature_celsius", "temperature_c", "Temperature of the device."),
    ("power_watts", "power_w", "Power draw of the device."),
]
_HISTOGRAMS = [  # (metric name, snapshot key, label, help)
    ("celery_gpu_queue_wait_seconds", "queue_wait_seconds", "device", "Wait in the pool before a task starts."),
    ("celery_gpu_task_run_seconds", "run_seconds", "device", "Run time of a task in its device process."),
    ("celery_gpu_batch_size", "batch_size", "task", "Items per batch."),
]


def _prometheus() -> Any:
    """The ``prometheus_client`` module, or a clear error when the optional extra is missing."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise RuntimeError(_MISSING) from exc
    return prometheus_client


def _le(bound: Any) -> str:
    """A bucket's upper bound as Prometheus writes it (``0.005``, ``+Inf``)."""
    from prometheus_client.utils import floatToGoString

    return str(floatToGoString(float(bound)))  # type: ignore[no-untyped-call]


class PoolCollector:
    """A custom Prometheus collector: each scrape turns the pool's current snapshot into metric families."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        """Nothing up front: the families depend on the snapshot (and registering must not call it)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The metric families of one snapshot; none at all when the pool has not started."""
        try:
            snap = self._snapshot()
        except Exception:
            logger.exception("celery-gpu metrics: taking the pool snapshot failed")
            return
        if snap is None:
            return
        families = _Families(str(snap["hostname"]))
        families.add_snapshot(snap)
        yield from (family for family in families.all() if family.samples)


class _Families:
    """The metric families of one scrape, filled from a snapshot."""

    def __init__(self, host: str) -> None:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        self.host = host
        self._gauge, self._counter, self._histogram = GaugeMetricFamily, CounterMetricFamily, HistogramMetricFamily
        self._families: dict[str, Any] = {}

    def all(self) -> list[Metric]:
        """Every family created so far, in creation order."""
        return list(self._families.values())

    def add(self, kind: str, name: str, doc: str, labels: dict[str, str], value: float) -> None:
        """One sample of a gauge or counter family (created on first use), ``host`` prepended to the labels."""
        family = self._families.get(name)
        if family is None:
            make = self._gauge if kind == "gauge" else self._counter
            family = self._families[name] = make(name, doc, labels=["host", *labels])
        family.add_metric([self.host, *labels.values()], float(value))

    def add_histogram(self, name: str, doc: str, label: str, key: str, hist: HistogramData) -> None:
        """One histogram; the snapshot's cumulative buckets are used as they are (``+Inf`` added if missing)."""
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = self._histogram(name, doc, labels=["host", label])
        buckets = [(_le(le), float(count)) for le, count in hist["buckets"]]
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", float(hist["count"])))
        family.add_metric([self.host, key], buckets, float(hist["sum"]))

    def add_snapshot(self, snap: Status) -> None:
        """Every metric of ``snap``."""
        for device in snap["devices"]:
            self.add_device(device)
        ready_doc = "1 when the worker's consumer has connected and every device process takes work."
        self.add("gauge", "celery_gpu_worker_ready", ready_doc, {}, 1 if snap.get("ready") else 0)
        pending_doc = "Tasks and batch items waiting in the pool."
        self.add("gauge", "celery_gpu_pending_tasks", pending_doc, {}, snap["pending"])
        for task, stats in snap["batching"].items():
            labels = {"task": task}
            self.add("gauge", "celery_gpu_batch_waiting_items", "Items waiting for a batch.", labels, stats["waiting"])
            self.add("counter", "celery_gpu_batches_total", "Batches run.", labels, stats["batches"])
            self.add("counter", "celery_gpu_batch_items_total", "Items run in batches.", labels, stats["items"])
            self.add("counter", "celery_gpu_batch_calls_total", "Calls of the batch task.", labels, stats["calls"])
        self.add_costs(snap.get("costs") or {})
        self.add_scaling(snap.get("scaling"))
        for task, count in (snap.get("expired") or {}).items():
            self.add("counter", "celery_gpu_expired_items_total",
                     "Items whose deadline (expires, deadline_ms) passed while they waited in the pool: ended "
                     "REVOKED, never run.", {"task": task}, count)
        histograms: dict[str, dict[str, HistogramData]] = dict(snap["histograms"])  # type: ignore[arg-type]
        for name, key, label, doc in _HISTOGRAMS:
            for value, hist in histograms.get(key, {}).items():
                self.add_histogram(name, doc, label, value, hist)
        age = max(0.0, time.time() - float(snap["timestamp"]))
        self.add("gauge", "celery_gpu_snapshot_age_seconds", "Age of the pool snapshot when scraped.", {}, age)

    def add_costs(self, costs: dict[str, CostInfo]) -> None:
        """What each task's items cost on the devices (device time, energy where known, items served)."""
        for task, cost in costs.items():
            labels = {"task": task}
            self.add("counter", "celery_gpu_device_seconds_total",
                     "Device time of the task's calls of task code (an item's share: call time / its items).",
                     labels, cost["device_s"])
            if cost.get("energy_j") is not None:
                self.add("counter", "celery_gpu_energy_joules_total",
                         "Energy of the task's calls (NVML's energy counter; simulated on fake devices).", labels,
                         float(cost["energy_j"] or 0.0))
            self.add("counter", "celery_gpu_metered_items_total",
                     "Items (or plain tasks) served by the metered calls.", labels, cost["items"])

    def add_scaling(self, scaling: ScalingInfo | None) -> None:
        """The autoscaling signals: broker backlog per queue; per task items waiting, batch fill, item memory."""
        if not scaling:
            return
        for queue, count in scaling["queues"].items():
            if count is not None:
                self.add("gauge", "celery_gpu_queue_backlog_messages",
                         "Messages waiting in the broker for the queue (sampled every gpu_backlog_interval).",
                         {"queue": queue}, count)
        for task, signals in scaling["tasks"].items():
            labels = {"task": task}
            self.add("gauge", "celery_gpu_waiting_items", "Items (and plain tasks) of the task waiting in the pool.",
                     labels, signals["waiting"])
            if signals["batch_fill"] is not None:
                self.add("gauge", "celery_gpu_batch_fill_ratio",
                         "Items / batch of the task's batches over the last minute.", labels, signals["batch_fill"])
            if signals["item_memory"] is not None:
                self.add("gauge", "celery_gpu_task_item_memory_bytes",
                         "Device memory one item needs (declared memory / batch, or learned).", labels,
                         signals["item_memory"])

    def add_device(self, dev: DeviceStatus) -> None:
        """The metrics of one device and its slots."""
        name = str(dev["device"])
        labels = {"device": name}
        # Tolerant of partial snapshots (a device without readings, counters a version did not have).
        readings: dict[str, Any] = dict(dev.get("readings") or {})
        for suffix, key, doc in _READINGS:
            if readings.get(key) is not None:
                self.add("gauge", f"celery_gpu_device_{suffix}", doc, labels, readings[key])
        total = readings.get("memory_total")
        total = dev["total_memory"] if total is None else total
        if total is not None:
            self.add("gauge", "celery_gpu_device_memory_total_bytes", "Memory of the device, in bytes.", labels, total)
        if dev.get("headroom") is not None:
            self.add("gauge", "celery_gpu_device_memory_headroom_bytes",
                     "Device memory left: total less the larger of what is reserved and what is in use.", labels,
                     dev["headroom"])
        for model, seen in (dev.get("models") or {}).items():
            model_labels = {**labels, "model": model}
            self.add("gauge", "celery_gpu_model_resident_bytes", "Bytes the model holds on the device now.",
                     model_labels, seen["resident_bytes"])
            self.add("counter", "celery_gpu_model_loads_total", "Loads of the model on the device.", model_labels,
                     seen["loads"])
            self.add("counter", "celery_gpu_model_evictions_total",
                     "Evictions of the model from the device (least recently used, by bytes).", model_labels,
                     seen["evictions"])
        reserved_doc = "Memory declared by the tasks running on the device, in bytes."
        self.add("gauge", "celery_gpu_device_memory_reserved_bytes", reserved_doc, labels, dev["reserved_memory"])
        quarantined_doc = "1 when the device is quarantined (marked failed)."
        self.add("gauge", "celery_gpu_device_quarantined", quarantined_doc, labels, 1 if dev["quarantined"] else 0)
        source = str(readings.get("source") or "none")
        info = {**labels, "name": str(dev["name"]), "kind": str(dev["kind"]), "source": source}
        self.add("gauge", "celery_gpu_device_info", "The device's name, kind and reading source; always 1.", info, 1)
        counters = dev["counters"]
        for outcome in ("succeeded", "failed"):
            tasks_doc = "Tasks finished on the device, by outcome."
            self.add("counter", "celery_gpu_tasks_total", tasks_doc, {**labels, "outcome": outcome}, counters[outcome])
        oom_doc = "Batches split after the device ran out of memory."
        self.add("counter", "celery_gpu_oom_splits_total", oom_doc, labels, counters["oom_splits"])
        self.add("counter", "celery_gpu_task_reruns_total", "Tasks queued again after their device process died.",
                 labels, counters.get("reruns", 0))
        self.add("counter", "celery_gpu_leak_recycles_total",
                 "Device processes replaced for holding more device memory than gpu_recycle_memory.", labels,
                 counters.get("leak_recycles", 0))
        self.add("counter", "celery_gpu_sticky_errors_total",
                 "Sticky CUDA errors reported by the device's processes (each replaced the process).", labels,
                 counters.get("sticky_errors", 0))
        for slot in dev["slots"]:
            slot_labels = {**labels, "slot": str(slot["slot"])}
            up = slot["pid"] is not None and slot["state"] not in _SLOT_DOWN
            self.add("gauge", "celery_gpu_slot_up", "1 when the slot has a live process.", slot_labels, int(up))
            busy = slot["state"] == "busy"
            self.add("gauge", "celery_gpu_slot_busy", "1 when the slot runs a task.", slot_labels, int(busy))
            restarts_doc = "Restarts of the slot's device process."
            self.add("counter", "celery_gpu_process_restarts_total", restarts_doc, slot_labels, slot["restarts"])


def _registry(snapshot: Snapshot) -> CollectorRegistry:
    """A registry of its own (never the global default) holding only the pool's collector."""
    registry: CollectorRegistry = _prometheus().CollectorRegistry(auto_describe=False)
    registry.register(cast("Collector", PoolCollector(snapshot)))
    return registry


def render(snapshot: Status | None) -> str:
    """The Prometheus text exposition of one snapshot."""
    prometheus = _prometheus()
    return cast(bytes, prometheus.generate_latest(_registry(lambda: snapshot))).decode()


def metrics_app(snapshot: Snapshot) -> Any:
    """The WSGI application of ``/metrics``: prometheus-client's, on a registry holding only the pool's collector;
    without prometheus-client, 503 and how to install it."""
    try:
        prometheus = _prometheus()
    except RuntimeError:
        def missing(environ: dict[str, Any], start: Any) -> list[bytes]:
            start("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
            return [(_MISSING + "\n").encode()]

        return missing
    return prometheus.make_wsgi_app(_registry(snapshot))


def start_exporter(port: int, snapshot: Snapshot, addr: str = "0.0.0.0") -> MetricsExporter:
    """Serve the pool's metrics at ``http://addr:port/metrics`` (``port=0``: any free port, see ``.port``), with
    ``/ready`` and ``/health`` beside them (:mod:`celery_gpu.observe.endpoint`).

    Raises :class:`MetricsPortInUse` when the port is taken. Without prometheus-client the endpoint runs and
    ``/metrics`` answers 503 with how to install it.
    """
    return start_endpoint(port, snapshot, addr=addr, metrics=metrics_app(snapshot))
