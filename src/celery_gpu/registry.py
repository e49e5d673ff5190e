"""The record of a ``GPU(app)`` that the lower layers read: one per Celery app.

The pool (to tell a device process how to import the app, and to place tasks that use a model) and the device
process (to run the setup hooks and load models) need four facts about an app's GPU support, and no more: the
module that created it, an explicit import name, the setup hooks and the declared models.
:class:`celery_gpu.api.GPU` *is* such a record; keeping the record here, below every process-side package,
means neither side has to import the public API to read it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from .devices import Device
from .models import ModelSpec

__all__ = ["AppRecord", "SetupHook", "record_of"]

#: A ``@gpu.setup`` hook: called with the process's :class:`~celery_gpu.devices.Device`.
SetupHook = Callable[[Device], Any]

_records: weakref.WeakKeyDictionary[Any, AppRecord] = weakref.WeakKeyDictionary()


class AppRecord:
    """GPU support of one Celery app, as the pool and the device processes see it.

    Attributes:
        app: the Celery app.
        module: the module whose code created the record (where the app is looked for first).
        import_name: ``"module:attr"`` by which device processes import the app, when given explicitly.
    """

    def __init__(self, app: Any, module: str, import_name: str | None) -> None:
        self.app = app
        self.module = module
        self.import_name = import_name
        self._setup_hooks: list[SetupHook] = []
        self._models: dict[str, ModelSpec] = {}
        _records[app] = self

    @property
    def setup_hooks(self) -> tuple[SetupHook, ...]:
        """Hooks run once in each device process, in registration order."""
        return tuple(self._setup_hooks)

    @property
    def model_specs(self) -> dict[str, ModelSpec]:
        """Declared models by name (``@gpu.model``)."""
        return dict(self._models)


def record_of(app: Any) -> AppRecord | None:
    """The record made for ``app`` (its ``GPU``), if any."""
    return _records.get(app)
