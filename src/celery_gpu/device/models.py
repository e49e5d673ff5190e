"""The models a device process holds: loaded on first use, kept while their bytes fit the process's budget,
evicted least recently used first (by bytes, :class:`~celery_gpu.models.Resident`) when a new one would not fit.

The pool sends each ``run`` / ``batch`` frame with the budget this process's models may take on the device (the
device's memory less the work reserved there and the models of its other processes). Before the work starts the
process evicts what no longer fits and loads the task's model (``@gpu.task(model=...)``); task code reads it as
``gpu.models["name"]``. A model's bytes are its declaration (``@gpu.model(memory=...)``), else what loading it
took (torch's allocated CUDA memory; on the CPU device the resident memory; nothing on a fake device). What the
process holds, loaded and evicted goes back with the work's answer, so the pool's mirror follows it.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from ..devices import Device, discover
from ..errors import ModelLoadError, UnknownModel
from ..models import ModelSpec, Resident
from ..units import human_bytes
from . import context, memory
from .classify import classify

__all__ = ["ModelCache", "lookup"]

logger = logging.getLogger("celery_gpu.pool")


class ModelCache:
    """The models of one process: loaded objects, their bytes in LRU order, and what happened since the last
    :meth:`take_events`."""

    def __init__(self, specs: dict[str, ModelSpec], device: Device, label: str = "") -> None:
        self.specs = specs
        self.device = device
        self.label = label or device.label
        self.objects: dict[str, Any] = {}
        self.resident = Resident()
        self.budget: int | None = None  # what the pool allows now; None: no limit (outside a device process)
        self.loads: list[str] = []
        self.evictions: list[str] = []

    def prepare(self, name: str | None, budget: int | None) -> None:
        """Before work: take ``budget`` (evicting what no longer fits), then make sure ``name`` is loaded."""
        self.budget = budget
        if name is None:
            self._evict(self.resident.to_evict(budget) if budget is not None else [])
        else:
            self.get(name)

    def get(self, name: str) -> Any:
        """The loaded model ``name`` (loaded now if needed, evicting least recently used ones to fit)."""
        if name in self.objects:
            self.resident.touch(name)
            if self.budget is not None:
                self._evict(self.resident.to_evict(self.budget, keep=name))
            return self.objects[name]
        spec = self.specs.get(name)
        if spec is None:
            raise UnknownModel(f"no model {name!r} is declared (@gpu.model); declared: {sorted(self.specs) or 'none'}")
        if self.budget is not None:
            self._evict(self.resident.to_evict(self.budget, need=spec.memory or 0))
        obj, size = self._load(spec)
        self.objects[name] = obj
        self.resident.add(name, size)
        self.loads.append(name)
        if self.budget is not None:  # measured bigger than it was declared (or not declared): make room now
            self._evict(self.resident.to_evict(self.budget, keep=name))
        return obj

    def _load(self, spec: ModelSpec) -> tuple[Any, int]:
        before = memory.allocated(self.device.kind)
        started = time.monotonic()
        try:
            obj = spec.load(self.device)
        except Exception as exc:
            if classify(exc) != "oom" or not self.objects:
                raise ModelLoadError(f"loading model {spec.name!r} on {self.label} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
            logger.warning("celery-gpu: %s ran out of memory loading model %s; evicting every other model and "
                           "trying again", self.label, spec.name)
            self._evict(list(self.resident.bytes))
            return self._load(spec)
        measured = max(0, memory.allocated(self.device.kind) - before, _tensor_bytes(obj))
        size = spec.memory if spec.memory is not None else measured
        logger.info("celery-gpu: %s loaded model %s (%s, %.2fs)", self.label, spec.name, human_bytes(size),
                    time.monotonic() - started)
        return obj, size

    def _evict(self, names: list[str]) -> None:
        if not names:
            return
        for name in names:
            logger.info("celery-gpu: %s evicts model %s (%s, least recently used) to fit %s", self.label, name,
                        human_bytes(self.resident.bytes.get(name, 0)), human_bytes(self.budget or 0))
            self.objects.pop(name, None)
            self.resident.remove(name)
            self.evictions.append(name)
        gc.collect()
        memory.free_cached()  # the allocator's cache: the device memory goes back to the device

    def take_events(self) -> tuple[list[str], list[str]]:
        """``(loaded, evicted)`` model names since the last call; both reset."""
        events = self.loads, self.evictions
        self.loads, self.evictions = [], []
        return events


def lookup(specs: dict[str, ModelSpec], name: str) -> Any:
    """``gpu.models[name]`` in task code: the model from this process's cache, loaded now if needed. Outside a
    device process (eager mode, a direct call) the model is loaded on the CPU device and kept, with no budget."""
    ctx = context.current()
    if ctx.models is None:
        ctx.models = ModelCache(specs, discover("cpu")[0])
    return ctx.models.get(name)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of a torch module's parameters and buffers (0 for anything else). On the CPU device the resident-memory
    growth can miss a model whose tensors reuse memory the allocator had already taken from the system."""
    params, buffers = getattr(obj, "parameters", None), getattr(obj, "buffers", None)
    if not callable(params) or not callable(buffers):
        return 0
    try:
        return sum(int(t.nelement()) * int(t.element_size()) for t in (*params(), *buffers()))
    except (TypeError, AttributeError, RuntimeError):
        return 0
