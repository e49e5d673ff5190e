"""The public face: ``gpu = GPU(app)``, ``@gpu.setup``, ``@gpu.task(memory=...)``, ``gpu.device``.

Creating a ``GPU`` loads no worker or device code: a producer that only sends tasks pays for neither. What the
worker needs is named by path (the pool, the consumer bootsteps, the task strategy) and loaded by Celery in the
worker process only. The ``gpu`` remote-control command is registered here, in every process of the app,
because Celery's ``celery inspect`` command line checks command names in its own (client) process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Celery, signals

from .devices import Device, current_device, discover
from .models import ModelLoader, ModelSpec
from .observe import control
from .payload import arrays, claims
from .registry import AppRecord, SetupHook, record_of
from .settings import Settings
from .tasks.batched import BatchOptions, item_runner
from .tasks.submit import with_mixin
from .units import parse_memory

__all__ = ["GPU", "POOL", "Models"]

#: The pool class path Celery loads through ``worker_pool``.
POOL = "celery_gpu.worker.pool:GPUPool"
#: The consumer bootsteps of a GPU app's workers (prefetch room for batches; bulk receive on Redis; the
#: malformed-message guard for the app's other tasks; the remote-control queue waited for after a reconnect).
CONSUMER_STEPS = ("celery_gpu.worker.consumer.prefetch:BatchPrefetch", "celery_gpu.worker.consumer.receive:BulkReceive",
                  "celery_gpu.worker.consumer.strategy:GuardStrategies",
                  "celery_gpu.worker.consumer.control_queue:WaitForControlQueue")
#: The task-message strategy of GPU tasks.
STRATEGY = "celery_gpu.worker.consumer.strategy:gpu_strategy"

F = TypeVar("F", bound=Callable[..., Any])


def _accept_arrays(sender: Celery, **_: Any) -> None:
    """Add the arrays serializer to what the app accepts (it is safe: no code runs on decode)."""
    for key in ("accept_content", "result_accept_content"):
        accepted = sender.conf.get(key)
        if accepted is None:
            continue  # result_accept_content None means "as accept_content"
        if arrays.NAME not in accepted and arrays.CONTENT_TYPE not in accepted:
            sender.conf[key] = [*accepted, arrays.NAME]


def _call_alone(task: Any, items: list[Any], kwargs: dict[str, Any]) -> list[Any]:
    """A batched task's call outside a batch (eager mode, a direct call): the device runtime's guarded call,
    loaded only when a batched task runs outside a batch."""
    from .device.split import call_alone

    return call_alone(task, items, kwargs)


class Models:
    """``gpu.models``: the declared models by name, each loaded in this process on first use."""

    def __init__(self, record: AppRecord) -> None:
        self._record = record

    def __getitem__(self, name: str) -> Any:
        from .device.models import lookup  # the device runtime, loaded only when a model is used

        return lookup(self._record.model_specs, name)

    def __contains__(self, name: object) -> bool:
        return name in self._record.model_specs

    def __iter__(self) -> Any:
        return iter(self._record.model_specs)

    def loaded(self) -> list[str]:
        """Models this process holds now, least recently used first."""
        from .device import context

        cache = context.current().models
        return [name for name, _ in cache.resident.items()] if cache is not None else []


class GPU(AppRecord):
    """GPU support for one Celery app.

    Creating it selects the GPU pool for the app's workers (``app.conf.worker_pool``) so that a stock
    ``celery -A proj worker`` runs tasks in long-lived, device-pinned processes.

    Args:
        app: the Celery app.
        import_name: ``"module:attr"`` by which device processes import the app; found automatically
            when the app is a module-level global (the usual case).
        devices: default device spec (``all``, ``cpu``, ``0,1``, ``fake:4x16GiB``); ``--gpus`` and
            ``CELERY_GPU_DEVICES`` override it.
        per_device: default processes per device; ``--per-gpu`` and ``CELERY_GPU_PER_DEVICE`` override it.
    """

    def __init__(
        self,
        app: Celery,
        *,
        import_name: str | None = None,
        devices: str | None = None,
        per_device: int | None = None,
    ) -> None:
        super().__init__(app, sys._getframe(1).f_globals.get("__name__", "__main__"), import_name)
        conf: dict[str, Any] = {"worker_pool": POOL}
        if devices is not None:
            conf["gpu_devices"] = devices
        if per_device is not None:
            conf["gpu_per_device"] = per_device
        app.conf.update(conf)
        for step in CONSUMER_STEPS:  # by path: Celery loads them in the worker only
            app.steps["consumer"].add(step)
        signals.worker_init.connect(self._size_worker, weak=False)
        control.register_command()  # `celery inspect gpu`, and the worker-gpu event after each heartbeat
        arrays.register()  # the safe arrays serializer: `serializer="celery-gpu-arrays"` on any task
        claims.configure_for_app(app)  # large arrays payloads out of band, in the app's store
        if app.configured:
            _accept_arrays(app)
        else:
            app.on_after_configure.connect(_accept_arrays, weak=False)

    @classmethod
    def of(cls, app: Celery) -> GPU | None:
        """The :class:`GPU` created for ``app``, if any."""
        record = record_of(app)
        return record if isinstance(record, GPU) else None

    def setup(self, fn: SetupHook) -> SetupHook:
        """Register ``fn(device)`` to run once per device process before it takes any task.

        Use it to load models (``device.state["model"] = ...``). The process's whole start (importing the app,
        then the hooks) has ``gpu_setup_timeout`` seconds (600 by default); if a hook raises, or the start takes
        longer, the error is logged and the device is marked failed instead of restarted in a loop.
        """
        self._setup_hooks.append(fn)
        return fn

    def model(self, name: str, *, memory: int | str | None = None) -> Callable[[ModelLoader], ModelLoader]:
        """Declare a model: ``fn(device)`` loads it and returns the loaded object.

        A device process loads a model the first time a task declared with ``model=name`` (or task code reading
        ``gpu.models[name]``) needs it, keeps it while the bytes of its models fit the device (with the memory
        the running work declares), and evicts the least recently used models, by bytes, when a new one would
        not fit (:mod:`celery_gpu.device.models`). The pool prefers a process that already holds a task's
        model, and fails at once with :class:`InsufficientDeviceMemory` a task whose model (plus its own
        ``memory=``) fits no device of the worker.

        Args:
            name: the model's name, as tasks refer to it.
            memory: the device memory the loaded model holds (bytes or ``"3GiB"``). Without it the bytes are
                measured when it loads (torch's allocated CUDA memory; the CPU device: resident memory).
        """
        size = None if memory is None else parse_memory(memory)

        def declare(fn: ModelLoader) -> ModelLoader:
            self._models[name] = ModelSpec(name, fn, size)
            return fn

        return declare

    @property
    def models(self) -> Models:
        """The declared models, loaded on use: ``gpu.models["bert"]`` in task code."""
        return Models(self)

    @overload
    def task(self, fn: F) -> Any: ...

    @overload
    def task(
        self, fn: None = None, *, memory: int | str | None = None, batch: int | None = None,
        max_wait_ms: float = 5.0, model: str | None = None, deadline_ms: float | None = None, **options: Any,
    ) -> Callable[[F], Any]: ...

    def task(
        self, fn: F | None = None, *, memory: int | str | None = None, batch: int | None = None,
        max_wait_ms: float = 5.0, model: str | None = None, deadline_ms: float | None = None, **options: Any,
    ) -> Any:
        """Declare a Celery task that runs on a device.

        It is a normal Celery task (``delay``, ``apply_async``, retries, time limits, ``bind=True``); it runs
        in a device process with ``gpu.device`` set. Every GPU task also has ``submit_many(items)``.

        Args:
            memory: device memory the task needs (bytes or ``"2GiB"``); the pool never places it on a device
                whose declared memory is taken, and fails it at once if no device of the worker is big enough.
                For a batched task: the memory of one call at full batch size. ``"auto"``: learned from
                the peaks observed on the device (its first run has a device to itself; see
                :mod:`celery_gpu.worker.admission`).
            batch: make it a batched task of up to ``batch`` items per call: the function takes a list and
                returns one result per item, while each ``delay(item)`` stays its own Celery task (see
                :mod:`celery_gpu.tasks.batched` for how calls map to the list).
            max_wait_ms: for a batched task, how long an item may be held back to fill a batch while other
                device processes are busy (a free worker with nothing else to do never waits).
            model: the declared model (``@gpu.model``) the task uses: loaded in its device process before it
                runs (``gpu.models[model]`` in the task), and the task preferably placed where it is loaded.
                ``memory=`` then covers the task's own working memory, not the model's.
            deadline_ms: a deadline relative to the moment the worker's pool receives each call, for callers that
                do not set ``expires``: a call still waiting in the pool then ends REVOKED as an expired Celery
                task (never run); with ``expires`` too, the earlier one counts. A held batch leaves in time for the
                earliest deadline of its items.
            **options: any ``app.task`` option.
        """
        auto = isinstance(memory, str) and memory.strip().lower() == "auto"
        gpu_memory = 0 if memory is None or auto else parse_memory(memory)

        def decorate(f: F) -> Any:
            options.setdefault("Strategy", STRATEGY)
            options.setdefault("gpu_model", model)
            if deadline_ms is not None:
                if deadline_ms <= 0:
                    raise ValueError(f"deadline_ms must be > 0, got {deadline_ms}")
                options.setdefault("gpu_deadline", float(deadline_ms) / 1000.0)
            options.setdefault("gpu_default_serializer", "serializer" not in options)
            options["base"] = with_mixin(options.get("base") or self.app.Task)
            if batch is None:
                return self.app.task(f, gpu=True, gpu_memory=gpu_memory, gpu_memory_auto=auto, **options)
            bind = bool(options.pop("bind", False))
            batch_options = BatchOptions(int(batch), float(max_wait_ms) / 1000.0, f, bind)
            return self.app.task(item_runner(f, bind, _call_alone), bind=True, gpu=True, gpu_memory=gpu_memory,
                                 gpu_memory_auto=auto, gpu_batch=batch_options, **options)

        return decorate(fn) if fn is not None else decorate

    @property
    def device(self) -> Device:
        """The device of the current device process (raises :class:`NotInDeviceProcess` elsewhere)."""
        return current_device()

    def settings(self) -> Settings:
        """The effective settings for this app (environment over ``app.conf`` over defaults)."""
        return Settings.from_app(self.app.conf)

    def _size_worker(self, sender: Any = None, **_: Any) -> None:
        # One message in flight per device process (times the prefetch multiplier): size the worker's
        # concurrency to the number of slots before the consumer computes its prefetch count; say which flags of
        # Celery's command line that overrides, and refuse a pool that cannot run this app's GPU tasks.
        conf = self.app.conf
        if sender is None or getattr(sender, "app", None) is not self.app:
            return
        from celery.concurrency import get_implementation

        pool: Any = getattr(sender, "pool_cls", None) or conf.worker_pool
        try:  # any spelling Celery accepts: "pkg.mod:Cls", "pkg.mod.Cls", an alias, the class itself
            cls = get_implementation(pool) if isinstance(pool, str) else pool
        except (ImportError, AttributeError, ValueError):
            return
        from .worker import flags  # this worker's main process: the worker layer is Celery's to load here

        if str(getattr(cls, "__module__", "")).startswith("celery_gpu."):
            from .worker.pool import GPUPool  # Celery has just loaded it, in this worker process

            if isinstance(cls, type) and issubclass(cls, GPUPool):
                settings = self.settings()
                devices = len(discover(settings.devices))
                flags.review(sender, self.app, devices * settings.per_device, devices, settings.per_device)
                return
        flags.refuse_foreign_pool(sender, self.app, _pool_name(pool, cls))


def _pool_name(pool: Any, cls: Any) -> str:
    """How a user names a pool: its alias (``threads``), else its class."""
    if isinstance(pool, str) and ":" not in pool and "." not in pool:
        return pool
    module = str(getattr(cls, "__module__", ""))
    if module.startswith("celery.concurrency."):
        alias = module.rsplit(".", 1)[-1]
        return "threads" if alias == "thread" else alias
    return str(getattr(cls, "__qualname__", cls))
