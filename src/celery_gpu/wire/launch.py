"""The command line of a device process: a few lines that tie it to its parent, then ``celery_gpu.device``.

A device process must never outlive the worker's main process (design decision 8). On Linux the kernel does
it: ``PR_SET_PDEATHSIG`` asks for SIGKILL when the parent dies. Set late, it leaves a window: a parent killed
while the child still imports Python (``celery_gpu``, Celery, the app: a second or more on a loaded machine)
leaves a child under init that goes on to run its setup hooks, for ever if one never returns. So the very
first lines the fresh interpreter runs (``python -c``, before any import of ours) set it, then compare
``getppid()`` with the pid of the process that started it: a parent that died before the ``prctl`` is seen
there, and the child exits at once (:data:`EXIT_ORPHANED`). From the ``prctl`` on, the kernel covers the rest.

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not only the process: the pool spawns
only from threads that live until its processes are gone (the worker's main thread, or the pool's own loop
thread, which stays up until warm shutdown has stopped every process; see ``worker/pool.py``).
"""

from __future__ import annotations

import sys

__all__ = ["EXIT_ORPHANED", "PARENT_ENV", "command"]

#: The pid of the process that starts a device process (its expected parent).
PARENT_ENV = "CELERY_GPU_PARENT_PID"
#: Exit status of a device process whose parent was already gone when it started.
EXIT_ORPHANED = 5

# Runs first in the fresh interpreter: only os, sys and ctypes are imported before the prctl.
_BOOT = f"""\
import os, sys
parent = int(os.environ.pop({PARENT_ENV!r}, "0") or 0)
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
if parent and os.getppid() != parent:
    os._exit({EXIT_ORPHANED})  # the parent died before the prctl: nobody is left to serve
import runpy
runpy.run_module("celery_gpu.device", run_name="__main__", alter_sys=True)
"""


def command() -> list[str]:
    """``argv`` of a device process (its environment must name the parent: :data:`PARENT_ENV`). The trailing
    ``celery_gpu.device`` is only a name for ``ps``."""
    return [sys.executable, "-c", _BOOT, "celery_gpu.device"]
