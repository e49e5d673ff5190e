"""Models on a device: their declarations, and the least-recently-used-by-bytes rule that decides which stay.

``@gpu.model("bert", memory="3GiB")`` declares a :class:`ModelSpec`; a task declared with ``model="bert"`` uses
it. Each device process keeps the models it loaded in a :class:`Resident` set, in least-recently-used order
with their bytes. Before a model is loaded (or work that needs room starts), the process evicts the least
recently used models *until the bytes fit* its budget (:meth:`Resident.to_evict`): as many as the bytes need,
which may be none (several small models stay) or several (one big model displaces two). Count-based rules
(keep N models) get both cases wrong when sizes differ.

The same rule runs on both sides of the pipe: in the device process, on the real models, and in the worker's
main process, on its mirror of each process's models (so it knows what a process holds before that process
answers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .devices import Device

__all__ = ["ModelLoader", "ModelSpec", "Resident"]

#: A model loader: called with the process's device, returns the loaded object.
ModelLoader = Callable[[Device], Any]


@dataclass(frozen=True)
class ModelSpec:
    """A declared model: its name, its loader and the device memory it holds (``None``: measured on load)."""

    name: str
    load: ModelLoader
    memory: int | None = None


class Resident:
    """Models a process holds, least recently used first, with their bytes."""

    def __init__(self, items: Iterable[tuple[str, int]] = ()) -> None:
        self.bytes: OrderedDict[str, int] = OrderedDict((str(n), int(b)) for n, b in items)

    def __contains__(self, name: object) -> bool:
        return name in self.bytes

    def __len__(self) -> int:
        return len(self.bytes)

    def total(self) -> int:
        """Bytes held by every model."""
        return sum(self.bytes.values())

    def touch(self, name: str) -> None:
        """``name`` was used now: the most recently used."""
        self.bytes.move_to_end(name)

    def add(self, name: str, size: int) -> None:
        """``name`` was loaded (``size`` bytes): the most recently used."""
        self.bytes[name] = int(size)
        self.bytes.move_to_end(name)

    def remove(self, name: str) -> None:
        self.bytes.pop(name, None)

    def to_evict(self, budget: int, need: int = 0, keep: str | None = None) -> list[str]:
        """The models to evict, least recently used first, so that what stays plus ``need`` bytes fits in
        ``budget``; never ``keep`` (the model about to be used). Empty when it fits already."""
        evict: list[str] = []
        left = self.total() + need
        for name, size in self.bytes.items():
            if left <= budget:
                break
            if name != keep:
                evict.append(name)
                left -= size
        return evict

    def items(self) -> list[tuple[str, int]]:
        """``(name, bytes)`` pairs, least recently used first."""
        return list(self.bytes.items())
