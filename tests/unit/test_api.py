"""The public API: GPU(app), @gpu.setup, @gpu.task, gpu.device, locate_app and worker sizing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, Task, signals

from celery_gpu import GPU, Device
from celery_gpu.api import POOL
from celery_gpu.devices import set_current
from celery_gpu.errors import AppNotImportable, NotInDeviceProcess
from celery_gpu.wire.appref import locate_app
from celery_gpu.worker.pool import GPUPool

GiB = 1024**3

# A module-level app, as in a real project: locate_app must find it by import.
app = Celery("celery_gpu_unit_api_module", set_as_current=False)
gpu = GPU(app)


@gpu.task(shared=False)
def module_task(x: int) -> int:
    return x + 1


def test_pool_path() -> None:
    assert POOL == "celery_gpu.worker.pool:GPUPool"
    assert f"{GPUPool.__module__}:{GPUPool.__qualname__}" == POOL


@pytest.mark.parametrize("path", ["celery_gpu.pool:GPUPool", "celery_gpu.pool.GPUPool", POOL])
def test_the_documented_pool_paths_load_the_pool(path: str) -> None:
    from celery.concurrency import get_implementation

    assert get_implementation(path) is GPUPool  # the path before the worker package still works


def test_gpu_selects_the_pool(make_app: Callable[..., Celery]) -> None:
    a = make_app()
    GPU(a)
    assert a.conf.worker_pool == "celery_gpu.worker.pool:GPUPool"
    assert app.conf.worker_pool == POOL


def test_gpu_defaults_go_to_conf(make_app: Callable[..., Celery]) -> None:
    a = make_app()
    GPU(a, devices="fake:2", per_device=3)
    assert a.conf.gpu_devices == "fake:2"
    assert a.conf.gpu_per_device == 3


def test_gpu_without_defaults_leaves_conf_alone(make_app: Callable[..., Celery]) -> None:
    a = make_app(gpu_devices="cpu")
    g = GPU(a)
    assert a.conf.gpu_devices == "cpu"
    assert a.conf.get("gpu_per_device") is None
    assert g.settings().devices == "cpu"
    assert g.settings().per_device == 1


def test_settings_read_the_environment(make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch) -> None:
    g = GPU(make_app(), devices="fake:2", per_device=3)
    monkeypatch.setenv("CELERY_GPU_PER_DEVICE", "1")
    s = g.settings()
    assert (s.devices, s.per_device) == ("fake:2", 1)


def test_of(make_app: Callable[..., Celery]) -> None:
    a, b = make_app(), make_app()
    g = GPU(a)
    assert GPU.of(a) is g
    assert GPU.of(b) is None
    assert GPU.of(app) is gpu


def test_setup_hooks_in_order(make_app: Callable[..., Celery]) -> None:
    g = GPU(make_app())
    assert list(g.setup_hooks) == []

    @g.setup
    def first(device: Device) -> None:
        device.state["order"] = ["first"]

    @g.setup
    def second(device: Device) -> None:
        device.state["order"].append("second")

    assert g.setup_hooks == (first, second)
    assert isinstance(g.setup_hooks, tuple)
    assert first.__name__ == "first"  # the decorator returns the function itself
    device = Device(0, "fake", "fake-0", GiB)
    for registered in g.setup_hooks:
        registered(device)
    assert device.state["order"] == ["first", "second"]


def test_bare_task(make_app: Callable[..., Celery]) -> None:
    a = make_app()
    g = GPU(a)

    @g.task
    def double(x: int) -> int:
        return x * 2

    assert isinstance(double, Task)
    assert double.gpu is True
    assert double.gpu_memory == 0
    assert double.name == f"{__name__}.double"
    assert double.name in a.tasks
    assert a.tasks[double.name].gpu is True
    assert double.run(21) == 42
    assert double(4) == 8
    result = double.apply(args=(5,))
    assert result.successful()
    assert result.get() == 10


def test_task_with_memory_and_options(make_app: Callable[..., Celery]) -> None:
    a = make_app()
    g = GPU(a)

    @g.task(memory="2GiB", name="x.y", max_retries=7)
    def infer(x: int, y: int = 1) -> int:
        return x + y

    assert infer.name == "x.y"
    assert infer.gpu is True
    assert infer.gpu_memory == 2 * 1024**3
    assert infer.max_retries == 7
    assert a.tasks["x.y"].gpu_memory == 2 * 1024**3
    assert a.tasks["x.y"].run is infer.run
    assert callable(infer.run)
    assert infer.run(1, y=2) == 3
    assert infer.apply(args=(1,), kwargs={"y": 5}).get() == 6


@pytest.mark.parametrize(
    ("memory", "expected"), [(1024, 1024), ("512MB", 512_000_000), (0, 0), ("1.5GiB", 3 * GiB // 2)]
)
def test_task_memory_forms(make_app: Callable[..., Celery], memory: int | str, expected: int) -> None:
    g = GPU(make_app())

    @g.task(memory=memory, shared=False)
    def t() -> None:
        return None

    assert t.gpu_memory == expected


def test_bound_task(make_app: Callable[..., Celery]) -> None:
    g = GPU(make_app())

    @g.task(bind=True, shared=False)
    def whoami(self: Task) -> str:
        return str(self.name)

    assert whoami.apply().get() == whoami.name


def test_failing_task_runs_eagerly_like_celery(make_app: Callable[..., Celery]) -> None:
    g = GPU(make_app())

    @g.task(shared=False)
    def boom() -> None:
        raise ValueError("no")

    result = boom.apply()
    assert result.failed()
    assert isinstance(result.result, ValueError)
    with pytest.raises(ValueError, match="no"):
        result.get()


def test_plain_celery_tasks_are_not_gpu_tasks(make_app: Callable[..., Celery]) -> None:
    a = make_app()
    GPU(a)

    @a.task(shared=False)  # type: ignore[untyped-decorator]
    def plain() -> int:
        return 1

    assert getattr(plain, "gpu", False) is False
    assert getattr(plain, "gpu_memory", 0) == 0


@pytest.mark.parametrize("memory", ["lots", "-1GiB", -5, True])
def test_bad_memory(make_app: Callable[..., Celery], memory: Any) -> None:
    a = make_app()
    g = GPU(a)
    with pytest.raises(ValueError):
        g.task(memory=memory)
    before = set(a.tasks)  # (Celery adds shared tasks of apps imported elsewhere in the session: compare)
    with pytest.raises(ValueError):
        g.task(lambda: None, memory=memory)  # type: ignore[call-overload]
    assert set(a.tasks) == before


def test_device_outside_a_device_process(make_app: Callable[..., Celery]) -> None:
    g = GPU(make_app())
    with pytest.raises(NotInDeviceProcess):
        g.device  # noqa: B018


def test_device_inside_a_device_process(make_app: Callable[..., Celery]) -> None:
    g = GPU(make_app())
    device = Device(2, "fake", "fake-2", GiB)
    set_current(device)
    try:
        assert g.device is device
        assert gpu.device is device  # the device belongs to the process, not the app
    finally:
        set_current(None)


def test_task_reading_gpu_device_in_a_device_process(make_app: Callable[..., Celery]) -> None:
    g = GPU(make_app())

    @g.task(shared=False)
    def where() -> str:
        return g.device.label

    with pytest.raises(NotInDeviceProcess):
        where.apply().get()
    set_current(Device(1, "fake", "fake-1", GiB))
    try:
        assert where.apply().get() == "fake:1"
    finally:
        set_current(None)


# -- locate_app -----------------------------------------------------------------------------------------


def test_locate_module_level_app() -> None:
    ref, modules = locate_app(app)
    assert ref == "tests.unit.test_api:app"
    assert __name__ == "tests.unit.test_api"
    assert __name__ in modules
    assert not [m for m in modules if m.startswith("celery.")]
    assert "__main__" not in modules
    assert modules == sorted(modules)


def test_located_ref_imports_the_same_app() -> None:
    import importlib

    ref, _ = locate_app(app)
    module, _, attr = ref.rpartition(":")
    assert getattr(importlib.import_module(module), attr) is app


def test_import_name_is_honoured(make_app: Callable[..., Celery]) -> None:
    a = make_app()
    GPU(a, import_name="a.b:app")
    ref, modules = locate_app(a)
    assert ref == "a.b:app"
    assert isinstance(modules, list)


def test_app_that_is_no_global_is_not_importable(make_app: Callable[..., Celery]) -> None:
    a = make_app()
    GPU(a)
    with pytest.raises(AppNotImportable, match="import_name"):
        locate_app(a)


# -- worker_init sizing ---------------------------------------------------------------------------------


class _Worker:
    """Stands in for Celery's WorkController as the worker_init sender (hashable, like the real one)."""

    def __init__(self, app: Celery, pool_cls: Any, concurrency: int) -> None:
        self.app = app
        self.pool_cls = pool_cls
        self.concurrency = concurrency


def _worker(a: Celery, pool_cls: Any, concurrency: int = 1) -> _Worker:
    return _Worker(a, pool_cls, concurrency)


@pytest.mark.parametrize("pool_cls", [POOL, GPUPool, None])
def test_size_worker_to_the_slots(make_app: Callable[..., Celery], pool_cls: Any) -> None:
    a = make_app()
    g = GPU(a, devices="fake:3", per_device=2)
    worker = _worker(a, pool_cls)
    g._size_worker(sender=worker)
    assert worker.concurrency == 6


def test_size_worker_through_the_signal(make_app: Callable[..., Celery]) -> None:
    a = make_app()
    GPU(a, devices="fake:2", per_device=2)
    worker = _worker(a, POOL, concurrency=16)
    signals.worker_init.send(sender=worker)
    assert worker.concurrency == 4


def test_size_worker_follows_the_environment(make_app: Callable[..., Celery], monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_app()
    g = GPU(a, devices="fake:3", per_device=2)
    monkeypatch.setenv("CELERY_GPU_DEVICES", "fake:5")
    monkeypatch.setenv("CELERY_GPU_PER_DEVICE", "1")
    worker = _worker(a, POOL)
    g._size_worker(sender=worker)
    assert worker.concurrency == 5


def test_size_worker_ignores_other_apps(make_app: Callable[..., Celery]) -> None:
    a, other = make_app(), make_app()
    g = GPU(a, devices="fake:3", per_device=2)
    worker = _worker(other, POOL, concurrency=8)
    g._size_worker(sender=worker)
    assert worker.concurrency == 8


@pytest.mark.parametrize("pool_cls", ["prefork", "solo", "celery.concurrency.prefork:TaskPool"])
def test_size_worker_leaves_other_pools_for_queues_without_gpu_tasks(make_app: Callable[..., Celery],
                                                                      pool_cls: str) -> None:
    a = make_app(broker_url="memory://")
    g = GPU(a, devices="fake:3", per_device=2)
    a.amqp.queues.select(["io-only"])  # -Q io-only: no GPU task is routed there
    worker = _worker(a, pool_cls, concurrency=8)
    g._size_worker(sender=worker)
    assert worker.concurrency == 8


@pytest.mark.parametrize(("pool_cls", "name"), [("threads", "threads"), ("solo", "solo"),
                                                ("celery.concurrency.prefork:TaskPool", "prefork")])
def test_size_worker_refuses_other_pools_that_would_take_gpu_tasks(make_app: Callable[..., Celery], pool_cls: str,
                                                                   name: str) -> None:
    a = make_app(broker_url="memory://")
    g = GPU(a, devices="fake:3", per_device=2)

    @g.task(name="t.sized_embed")
    def embed(x: int) -> int:
        return x

    with pytest.raises(SystemExit, match=f"the {name} pool cannot run GPU tasks.*t.sized_embed"):
        g._size_worker(sender=_worker(a, pool_cls, concurrency=8))


def test_size_worker_ignores_a_missing_sender(make_app: Callable[..., Celery]) -> None:
    g = GPU(make_app(), devices="fake:3")
    g._size_worker(sender=None)
    g._size_worker()
    g._size_worker(sender=object())


def test_gpu_registers_one_worker_init_receiver(make_app: Callable[..., Celery]) -> None:
    before = len(signals.worker_init.receivers)
    GPU(make_app())
    assert len(signals.worker_init.receivers) == before + 1


@pytest.mark.parametrize(("pool", "expected"), [(None, 6), ("solo", 1)])
def test_real_work_controller_is_sized_before_its_pool(
    make_app: Callable[..., Celery], pool: str | None, expected: int
) -> None:
    # Celery's own WorkController (in-memory transport, never started): worker_init fires with the configured
    # pool, and the GPU pool it then builds has one slot per device process.
    a = make_app(broker_url="memory://")
    GPU(a, devices="fake:3", per_device=2)
    queues = ["io-only"] if pool == "solo" else None  # solo may serve queues that no GPU task is routed to
    worker = a.WorkController(hostname="unit@test", concurrency=1, pool_cls=pool, without_mingle=True,
                              without_gossip=True, without_heartbeat=True, queues=queues)
    assert worker.concurrency == expected
    if pool is None:
        assert isinstance(worker.pool, GPUPool)
        assert worker.pool.num_processes == 6
        assert [s.device.label for s in worker.pool.slots] == ["fake:0", "fake:0", "fake:1", "fake:1", "fake:2",
                                                              "fake:2"]


def test_real_work_controller_with_dotted_pool_path_is_sized(make_app: Callable[..., Celery]) -> None:
    a = make_app(broker_url="memory://")
    GPU(a, devices="fake:3", per_device=2)
    worker = a.WorkController(hostname="unit@test", concurrency=1, pool_cls="celery_gpu.pool.GPUPool",
                              without_mingle=True, without_gossip=True, without_heartbeat=True)
    assert isinstance(worker.pool, GPUPool)
    assert worker.pool.num_processes == 6
    assert worker.concurrency == 6


def test_models_are_declared_and_tasks_name_them(make_app: Callable[..., Celery]) -> None:
    from celery_gpu.device import context

    app = make_app()
    gpu = GPU(app)

    @gpu.model("bert", memory="3GiB")
    def load_bert(device: Device) -> dict[str, str]:
        return {"bert": device.label}

    @gpu.model("measured")
    def load_measured(device: Device) -> str:
        return "m"

    @gpu.task(model="bert", shared=False)
    def embed(text: str) -> Any:
        return gpu.models["bert"]["bert"], text

    assert gpu.model_specs["bert"].memory == 3 * GiB and gpu.model_specs["bert"].load is load_bert
    assert gpu.model_specs["measured"].memory is None
    assert embed.gpu_model == "bert" and "bert" in gpu.models and sorted(gpu.models) == ["bert", "measured"]
    saved, context.current().models = context.current().models, None
    try:  # eager mode: the model loads in this process, on the CPU device
        assert embed.apply(("hi",)).get() == ("cpu", "hi")
        assert gpu.models.loaded() == ["bert"]
    finally:
        context.current().models = saved
