"""How a fresh interpreter finds the Celery app: located by import reference in the main process,
imported from that reference in the device process."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from ..errors import AppNotImportable
from ..registry import record_of

__all__ = ["locate_app", "import_app"]


def locate_app(app: Any) -> tuple[str, list[str]]:
    """How a fresh interpreter imports ``app``: ``("module:attr", [modules defining its tasks])``.

    Raises:
        AppNotImportable: the app is not a global of any imported module.
    """
    record = record_of(app)
    modules = sorted({
        type(task).__module__ for task in app.tasks.values()
        if not type(task).__module__.startswith("celery.")
    } - {"__main__", "__mp_main__"})
    if record is not None and record.import_name:
        return record.import_name, modules
    names = ([record.module] if record is not None else []) + [n for n in list(sys.modules) if n != "__main__"]
    names.append("__main__")
    for name in names:
        module = sys.modules.get(name)
        try:
            found = [attr for attr, value in vars(module).items() if value is app] if module else []
        except TypeError:
            continue
        if found:
            if name in ("__main__", "__mp_main__"):
                path = getattr(module, "__file__", None)
                if path is None:
                    break
                return f"{os.path.abspath(path)}:{found[0]}", modules
            return f"{name}:{found[0]}", modules
    raise AppNotImportable(
        "device processes cannot import this Celery app: make it a module-level global, "
        "or pass GPU(app, import_name='package.module:app')"
    )


def _load_module(ref: str) -> Any:
    if ref.endswith(".py"):  # the app lives in a script run as __main__
        spec = importlib.util.spec_from_file_location("__mp_main__", ref)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {ref}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["__mp_main__"] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(ref)


def import_app(app_ref: str, modules: list[str]) -> Any:
    """Import the app named ``module:attr`` (or ``/path/file.py:attr``) and the modules defining its tasks."""
    module_ref, _, attr = app_ref.rpartition(":")
    app = getattr(_load_module(module_ref), attr)
    for name in modules:
        importlib.import_module(name)
    app.loader.init_worker()
    app.set_current()
    app.set_default()
    app.finalize(auto=True)
    return app
