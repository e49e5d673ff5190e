"""What "the worker's main process never touches CUDA" means on a real GPU, checked from outside the process.

Reading NVML maps the CUDA driver library: on an H200 with driver 580.159.04, ``pynvml.nvmlInit()`` alone puts
``libcuda.so`` into a process's maps (and no CUDA runtime, no context). Device discovery and the memory
readings use NVML in the main process by design, so a mapped ``libcuda`` beside ``libnvidia-ml`` is expected.
What must never be there: torch, the CUDA runtime or CuPy (a framework that could create a context, which a
forked child cannot survive), and a CUDA context, which NVML lists among the GPU's compute processes.
"""

from __future__ import annotations

from pathlib import Path

#: Libraries that only a framework or a CUDA runtime user maps; NVML never loads these.
FRAMEWORK_LIBS = ("libtorch", "libcudart", "libc10_cuda", "cupy", "libnvrtc", "libcublas")


def mapped_libraries(pid: int) -> set[str]:
    """The file paths mapped into process ``pid``."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if len(line.split()) >= 6}


def compute_pids() -> set[int] | None:
    """Pids holding a CUDA context on any GPU, as NVML lists them; None where NVML cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        pids: set[int] = set()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            pids |= {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        return pids
    finally:
        pynvml.nvmlShutdown()


def assert_cuda_free(main_pid: int, device_pids: list[int]) -> None:
    """The main process maps no framework or CUDA runtime, maps the driver only beside NVML, and holds no CUDA
    context; where NVML lists contexts by pid here (it lists the device processes'), the main pid is not one."""
    libs = mapped_libraries(main_pid)
    framework = sorted(lib for lib in libs if any(name in lib for name in FRAMEWORK_LIBS))
    assert not framework, f"the worker's main process maps {framework}"
    if any("libcuda" in lib for lib in libs):
        assert any("libnvidia-ml" in lib for lib in libs), f"libcuda mapped without NVML: {sorted(libs)}"
    contexts = compute_pids()
    if contexts and set(device_pids) & contexts:  # NVML sees this pid namespace's processes
        assert main_pid not in contexts, f"the worker's main process {main_pid} holds a CUDA context"
