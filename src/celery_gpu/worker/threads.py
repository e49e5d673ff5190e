"""The CPU thread budget of the CPU device's processes.

torch, OpenMP, MKL and OpenBLAS each start one thread per core in every process, so two device processes on the
CPU device oversubscribe the cores and run slower together than one alone (issue 16: 224 items/s with one
process, 96 with two, 312 with two at ``OMP_NUM_THREADS=1``). Each process on the CPU device gets a budget:
``gpu_cpu_threads`` (``CELERY_GPU_CPU_THREADS``, ``celery-gpu worker --cpu-threads``) when set, else
``OMP_NUM_THREADS`` when the worker's environment sets it, else the cores this worker may use (affinity and
cgroup quota) divided among the CPU device's processes, at least one. The thread variables are set before the
interpreter starts (an explicit budget replaces the worker's own; else a variable the environment already sets
is kept) and the device process calls ``torch.set_num_threads`` once the app is imported.

Processes on GPUs and fake devices keep the environment as it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["THREAD_VARIABLES", "budget", "cores", "thread_env"]

#: The variables the thread pools of torch/OpenMP, MKL, OpenBLAS, Accelerate and numexpr read at start.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")


def cores() -> int:
    """The CPUs this worker may use: its affinity mask, capped by a cgroup CPU quota (Celery's own reading)."""
    try:
        from celery.utils.sysinfo import cpu_budget
    except ImportError:  # Celery before 5.6
        try:
            return len(os.sched_getaffinity(0)) or 1
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    return max(1, int(cpu_budget().count))


def _positive(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None


def budget(setting: int, processes: int, environ: Mapping[str, str]) -> int:
    """Threads for each of ``processes`` processes on the CPU device (see the module docstring)."""
    if setting > 0:
        return setting
    return _positive(environ.get("OMP_NUM_THREADS")) or max(1, cores() // max(1, processes))


def thread_env(setting: int, processes: int, environ: Mapping[str, str]) -> tuple[int, dict[str, str]]:
    """The budget and the thread variables a CPU-device process starts with (added to ``environ``)."""
    threads = budget(setting, processes, environ)
    return threads, {name: str(threads) for name in THREAD_VARIABLES if setting > 0 or name not in environ}
