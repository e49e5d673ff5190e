"""Which models each device process holds, as the pool's main process sees it: a mirror per slot.

At dispatch the pool applies to a slot's mirror what its device process is about to do (evict least recently
used models, by bytes, until its budget fits; load the work's model: the rule of
:class:`~celery_gpu.models.Resident`), so placements made before that process answers see it; each answer then
replaces the mirror with what the process reports. A process that exits holds nothing.
"""

from __future__ import annotations

from collections import defaultdict

from ..models import ModelSpec, Resident
from ..observe.snapshot import ModelInfo

__all__ = ["Residency"]


class Residency:
    """Models per slot (label → :class:`Resident`) and the bytes of each declared model."""

    def __init__(self, specs: dict[str, ModelSpec] | None = None) -> None:
        self.declared = {name: spec.memory for name, spec in (specs or {}).items()}
        self.measured: dict[str, int] = {}  # bytes a process reported for a model declared without memory=
        self.slots: dict[str, Resident] = defaultdict(Resident)
        self.loads: dict[tuple[str, str], int] = defaultdict(int)  # (device, model) -> loads
        self.evictions: dict[tuple[str, str], int] = defaultdict(int)

    def known(self, model: str) -> bool:
        return model in self.declared

    def size(self, model: str | None) -> int:
        """Bytes ``model`` takes on a device: declared, else as measured (0 before its first load)."""
        if model is None:
            return 0
        declared = self.declared.get(model)
        return declared if declared is not None else self.measured.get(model, 0)

    def holds(self, slot: str, model: str | None) -> bool:
        return model is not None and model in self.slots[slot]

    def held_anywhere(self, model: str) -> bool:
        """Whether some process holds ``model`` now."""
        return any(model in resident for resident in self.slots.values())

    def held(self, slot: str) -> int:
        """Bytes of the models ``slot``'s process holds."""
        return self.slots[slot].total() if slot in self.slots else 0

    def on_device(self, device: str, but: str | None = None) -> int:
        """Bytes of the models held by the processes of ``device`` (slot labels ``device#i``), ``but`` one."""
        return sum(r.total() for label, r in self.slots.items()
                   if label != but and label.rpartition("#")[0] == device)

    def by_device(self) -> dict[str, dict[str, int]]:
        """Per device: bytes held per model, summed over its processes."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for label, resident in self.slots.items():
            models = out[label.rpartition("#")[0]]
            for name, size in resident.items():
                models[name] = models.get(name, 0) + size
        return dict(out)

    def dispatch(self, slot: str, model: str | None, budget: int) -> None:
        """``slot`` was sent work with ``model`` and ``budget``: what its process will evict and load."""
        resident = self.slots[slot]
        if model is not None and model in resident:
            resident.touch(model)
            keep: str | None = model
            need = 0
        else:
            keep, need = None, self.size(model)
        for name in resident.to_evict(budget, need=need, keep=keep):
            resident.remove(name)
        if model is not None and model not in resident:
            resident.add(model, self.size(model))

    def report(self, device: str, slot: str, models: list[tuple[str, int]], loaded: list[str],
               evicted: list[str]) -> None:
        """What ``slot``'s process said it holds (least recently used first), loaded and evicted."""
        self.slots[slot] = Resident(models)
        for name, size in models:
            if self.declared.get(name, 0) is None:
                self.measured[name] = size
        for name in loaded:
            self.loads[(device, name)] += 1
        for name in evicted:
            self.evictions[(device, name)] += 1

    def clear(self, slot: str) -> None:
        """``slot``'s process exited: its models went with it."""
        self.slots.pop(slot, None)

    def info(self, device: str) -> dict[str, ModelInfo]:
        """Per model seen on ``device``: bytes held now, loads and evictions there."""
        held = self.by_device().get(device, {})
        names = set(held) | {m for d, m in self.loads if d == device} | {m for d, m in self.evictions if d == device}
        return {name: {"resident_bytes": held.get(name, 0), "loads": self.loads.get((device, name), 0),
                       "evictions": self.evictions.get((device, name), 0)} for name in sorted(names)}
