"""Settings: one typed object; CLI flags, environment variables and ``app.conf`` map onto it one to one.

Precedence: environment (which the ``celery-gpu worker`` flags set) over ``app.conf`` over defaults.

====================  ===========================  ===============================  =========
field                 app.conf key                 environment                      default
====================  ===========================  ===============================  =========
devices               ``gpu_devices``              ``CELERY_GPU_DEVICES``           ``all``
per_device            ``gpu_per_device``           ``CELERY_GPU_PER_DEVICE``        ``1``
max_frame             ``gpu_max_frame``            ``CELERY_GPU_MAX_FRAME``         1 GiB
start_attempts        ``gpu_start_attempts``       ``CELERY_GPU_START_ATTEMPTS``    ``3``
shutdown_timeout      ``gpu_shutdown_timeout``     ``CELERY_GPU_SHUTDOWN_TIMEOUT``  ``60``
bulk_receive          ``gpu_bulk_receive``         ``CELERY_GPU_BULK_RECEIVE``      ``256``
metrics_port          ``gpu_metrics_port``         ``CELERY_GPU_METRICS_PORT``      ``0`` (off)
metrics_addr          ``gpu_metrics_addr``         ``CELERY_GPU_METRICS_ADDR``      ``0.0.0.0``
claim_threshold       ``gpu_claim_threshold``      ``CELERY_GPU_CLAIM_THRESHOLD``   1 MiB (0: off)
claim_ttl             ``gpu_claim_ttl``            ``CELERY_GPU_CLAIM_TTL``         ``86400``
max_attempts          ``gpu_max_attempts``         ``CELERY_GPU_MAX_ATTEMPTS``      ``3``
dead_letter_queue     ``gpu_dead_letter_queue``    ``CELERY_GPU_DEAD_LETTER_QUEUE`` (none)
heartbeat_timeout     ``gpu_heartbeat_timeout``    ``CELERY_GPU_HEARTBEAT_TIMEOUT`` ``60`` (0: off)
recycle_memory        ``gpu_recycle_memory``       ``CELERY_GPU_RECYCLE_MEMORY``    ``0`` (off)
setup_timeout         ``gpu_setup_timeout``        ``CELERY_GPU_SETUP_TIMEOUT``     ``600`` (0: off)
sticky_limit          ``gpu_sticky_limit``         ``CELERY_GPU_STICKY_LIMIT``      ``3`` (0: off)
sticky_window         ``gpu_sticky_window``        ``CELERY_GPU_STICKY_WINDOW``     ``600``
oom_cap_quiet         ``gpu_oom_cap_quiet``        ``CELERY_GPU_OOM_CAP_QUIET``     ``300`` (0: never)
cost_in_result        ``gpu_cost_in_result``       ``CELERY_GPU_COST_IN_RESULT``    ``False``
backlog_interval      ``gpu_backlog_interval``     ``CELERY_GPU_BACKLOG_INTERVAL``  ``5`` (0: off)
model_wait            ``gpu_model_wait``           ``CELERY_GPU_MODEL_WAIT``        ``0.5``
priority_aging        ``gpu_priority_aging``       ``CELERY_GPU_PRIORITY_AGING``    ``1.0``
cpu_threads           ``gpu_cpu_threads``          ``CELERY_GPU_CPU_THREADS``       ``0`` (auto)
inflight_lease        ``gpu_inflight_lease``       ``CELERY_GPU_INFLIGHT_LEASE``    ``30``
====================  ===========================  ===============================  =========
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from .units import parse_memory

__all__ = ["MAX_FRAME", "Settings"]

_TRUE = frozenset({"1", "true", "yes", "on"})
#: Largest frame accepted on a device-process pipe by default: a whole Celery message body travels in one frame.
MAX_FRAME = 1 << 30


@dataclass(frozen=True)
class Settings:
    """How a worker lays out and supervises its device processes.

    Attributes:
        devices: device spec: ``all``, ``cpu``, ``0,1``, ``fake:4`` or ``fake:4x16GiB``.
        per_device: device processes (slots) per device.
        max_frame: largest message (bytes) accepted on a device-process pipe.
        start_attempts: consecutive failed starts of a slot before its device is marked failed.
        shutdown_timeout: seconds a warm shutdown waits for in-flight tasks before killing them.
        bulk_receive: on a Redis broker, messages taken in one extra round trip after each ``BRPOP`` reply
            (within the prefetch window); 0 receives one message per round trip, as kombu does.
        metrics_port: TCP port of the Prometheus endpoint (``/metrics``) of the worker; 0 turns it off.
        metrics_addr: address that endpoint listens on.
        claim_threshold: arrays-serializer payloads this large or larger are stored out of band (the result
            backend's Redis, else the broker's) and the message carries a reference; 0 turns it off, and so
            does an app with no Redis at all (a shared directory is only used when configured explicitly).
        claim_ttl: seconds a stored payload is kept when no task consumes it.
        max_attempts: runs of a task whose device process dies under it (crash, sticky CUDA error, frozen)
            before it fails with ``TaskCrashedDevice``; the first run counts.
        dead_letter_queue: queue that such a task's message is published to when it fails so ("": none).
        heartbeat_timeout: seconds of silence after which a device process counts as frozen and is killed
            (its tasks run again elsewhere); 0 turns the watchdog off. Task time limits act on their own.
        recycle_memory: a device process holding more device memory than this after a task is replaced
            (leaks); 0 turns it off. ``--max-tasks-per-child`` recycles after N tasks.
        setup_timeout: seconds a device process may take from its start to ``ready`` (importing the app and
            running the ``@gpu.setup`` hooks); one that takes longer is killed and its device marked failed,
            as when a hook raises. 0 turns it off.
        sticky_limit: sticky CUDA errors on one device within ``sticky_window`` seconds after which the device
            is taken out of service (quarantined); 0 turns it off (each process is only replaced).
        sticky_window: the window of ``sticky_limit``, in seconds.
        oom_cap_quiet: seconds without an out-of-memory split after which the batch cap that a split set for a
            task on a device doubles (again after each further period, until it is gone); 0 keeps caps for
            the worker's lifetime.
        cost_in_result: store each task's (or batch item's) share of its call's device time and energy in its
            result meta (``gpu_cost``); the totals per task are in the metrics and ``celery-gpu status`` anyway.
        backlog_interval: seconds between samples of the broker backlog (messages waiting) of each queue the
            worker consumes, taken on a connection and thread of their own; 0 turns it off.
        model_wait: seconds work that uses a model (``@gpu.task(model=...)``) waits for a busy device process
            that holds it, when no idle one does, before it goes to another process (which loads it too).
        priority_aging: seconds of waiting one level of Celery priority is worth: a job counts as having arrived
            that much earlier per level above the lowest, so it overtakes lower-priority work that arrived up to
            (levels between them) x this before it, and no further (no starvation).
        cpu_threads: CPU threads of each process on the CPU device (torch, OpenMP, MKL, OpenBLAS); 0: the
            worker's ``OMP_NUM_THREADS`` if set, else its cores divided among the CPU device's processes
            (:mod:`celery_gpu.worker.threads`).
        inflight_lease: on a Redis broker, seconds a worker's lease on the messages it holds lasts without a
            renewal (renewed every fifth of it): when a worker's lease lapses (it died, or lost its link to
            the broker), another worker puts its messages back in their queues; a worker also puts back, at
            start, what an earlier run under its name still held (:mod:`celery_gpu.worker.consumer.inflight`).
    """

    devices: str = "all"
    per_device: int = 1
    max_frame: int = MAX_FRAME
    start_attempts: int = 3
    shutdown_timeout: float = 60.0
    bulk_receive: int = 256
    metrics_port: int = 0
    metrics_addr: str = "0.0.0.0"
    claim_threshold: int = 1024 * 1024
    claim_ttl: float = 24 * 3600.0
    max_attempts: int = 3
    dead_letter_queue: str = ""
    heartbeat_timeout: float = 60.0
    recycle_memory: int = 0
    setup_timeout: float = 600.0
    sticky_limit: int = 3
    sticky_window: float = 600.0
    oom_cap_quiet: float = 300.0
    cost_in_result: bool = False
    backlog_interval: float = 5.0
    model_wait: float = 0.5
    priority_aging: float = 1.0
    cpu_threads: int = 0
    inflight_lease: float = 30.0

    def __post_init__(self) -> None:
        if self.per_device < 1:
            raise ValueError(f"per_device must be >= 1, got {self.per_device}")
        if self.start_attempts < 1:
            raise ValueError(f"start_attempts must be >= 1, got {self.start_attempts}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.heartbeat_timeout < 0:
            raise ValueError(f"heartbeat_timeout must be >= 0, got {self.heartbeat_timeout}")
        if self.bulk_receive < 0:
            raise ValueError(f"bulk_receive must be >= 0, got {self.bulk_receive}")
        for name in ("setup_timeout", "sticky_limit", "sticky_window", "oom_cap_quiet", "backlog_interval",
                     "model_wait", "priority_aging"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.inflight_lease <= 0:
            raise ValueError(f"inflight_lease must be > 0, got {self.inflight_lease}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0, got {self.cpu_threads}")

    @classmethod
    def from_app(cls, conf: Any = None, environ: dict[str, str] | None = None) -> Settings:
        """Read the settings from a Celery ``app.conf`` (or any mapping) and the environment."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"CELERY_GPU_{f.name.upper()}")
            if raw is None and conf is not None:
                raw = conf.get(f"gpu_{f.name}")
            if raw is None:
                continue
            if f.name in ("max_frame", "claim_threshold", "recycle_memory"):
                values[f.name] = parse_memory(raw)
            elif f.type in ("bool", bool):
                values[f.name] = raw if isinstance(raw, bool) else str(raw).strip().lower() in _TRUE
            elif f.type in ("int", int):
                values[f.name] = int(raw)
            elif f.type in ("float", float):
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        return cls(**values)
