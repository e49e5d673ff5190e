"""Settings: defaults, app.conf keys, environment overrides, validation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import FrozenInstanceError

import pytest
from celery import Celery

from celery_gpu.settings import Settings
from celery_gpu.wire.frames import MAX_FRAME

MiB = 1024**2


def test_defaults() -> None:
    s = Settings()
    assert s.devices == "all"
    assert s.per_device == 1
    assert s.max_frame == MAX_FRAME == 1024**3
    assert s.start_attempts == 3
    assert s.shutdown_timeout == 60.0


def test_from_app_without_conf_or_environment_is_the_defaults() -> None:
    assert Settings.from_app(None, environ={}) == Settings()


def test_from_a_fresh_app_is_the_defaults(make_app: Callable[..., Celery]) -> None:
    assert Settings.from_app(make_app().conf, environ={}) == Settings()


def test_settings_are_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        Settings().per_device = 2  # type: ignore[misc]


def test_app_conf_keys(make_app: Callable[..., Celery]) -> None:
    app = make_app(gpu_devices="fake:2x8GiB", gpu_per_device=3, gpu_max_frame="64MiB", gpu_start_attempts=5,
                   gpu_shutdown_timeout=2.5)
    s = Settings.from_app(app.conf, environ={})
    assert s == Settings(devices="fake:2x8GiB", per_device=3, max_frame=64 * MiB, start_attempts=5,
                         shutdown_timeout=2.5)
    assert type(s.per_device) is int
    assert type(s.max_frame) is int
    assert type(s.shutdown_timeout) is float


def test_app_conf_strings_are_converted(make_app: Callable[..., Celery]) -> None:
    app = make_app(gpu_per_device="2", gpu_max_frame=4096, gpu_shutdown_timeout="7")
    s = Settings.from_app(app.conf, environ={})
    assert (s.per_device, s.max_frame, s.shutdown_timeout) == (2, 4096, 7.0)


def test_plain_mapping_as_conf() -> None:
    s = Settings.from_app({"gpu_devices": "cpu", "gpu_per_device": 4}, environ={})
    assert (s.devices, s.per_device) == ("cpu", 4)


def test_environment_overrides_conf(make_app: Callable[..., Celery]) -> None:
    app = make_app(gpu_devices="fake:2", gpu_per_device=3, gpu_max_frame="64MiB")
    env = {"CELERY_GPU_DEVICES": "0,1", "CELERY_GPU_PER_DEVICE": "2", "CELERY_GPU_MAX_FRAME": "1MiB",
           "CELERY_GPU_START_ATTEMPTS": "1", "CELERY_GPU_SHUTDOWN_TIMEOUT": "0.5"}
    s = Settings.from_app(app.conf, environ=env)
    assert s == Settings(devices="0,1", per_device=2, max_frame=MiB, start_attempts=1, shutdown_timeout=0.5)


def test_environment_overrides_only_what_it_sets(make_app: Callable[..., Celery]) -> None:
    app = make_app(gpu_devices="fake:2", gpu_per_device=3)
    s = Settings.from_app(app.conf, environ={"CELERY_GPU_PER_DEVICE": "5"})
    assert (s.devices, s.per_device, s.max_frame) == ("fake:2", 5, MAX_FRAME)


def test_environment_without_conf() -> None:
    s = Settings.from_app(None, environ={"CELERY_GPU_DEVICES": "fake:4"})
    assert s.devices == "fake:4"
    assert s.per_device == 1


def test_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch, make_app: Callable[..., Celery]) -> None:
    monkeypatch.setenv("CELERY_GPU_DEVICES", "cpu")
    monkeypatch.setenv("CELERY_GPU_PER_DEVICE", "4")
    s = Settings.from_app(make_app(gpu_devices="fake:1").conf)
    assert (s.devices, s.per_device) == ("cpu", 4)


def test_unrelated_environment_is_ignored() -> None:
    s = Settings.from_app(None, environ={"GPU_DEVICES": "cpu", "CELERY_GPU": "x", "celery_gpu_devices": "cpu"})
    assert s == Settings()


@pytest.mark.parametrize("value", [0, -1])
def test_per_device_below_one_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="per_device must be >= 1"):
        Settings(per_device=value)


def test_per_device_zero_from_conf_or_environment(make_app: Callable[..., Celery]) -> None:
    with pytest.raises(ValueError, match="per_device"):
        Settings.from_app(make_app(gpu_per_device=0).conf, environ={})
    with pytest.raises(ValueError, match="per_device"):
        Settings.from_app(None, environ={"CELERY_GPU_PER_DEVICE": "0"})


def test_start_attempts_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="start_attempts"):
        Settings.from_app(None, environ={"CELERY_GPU_START_ATTEMPTS": "0"})


@pytest.mark.parametrize(("key", "value"), [("CELERY_GPU_PER_DEVICE", "two"), ("CELERY_GPU_MAX_FRAME", "lots"),
                                            ("CELERY_GPU_SHUTDOWN_TIMEOUT", "soon")])
def test_unparseable_values_are_value_errors(key: str, value: str) -> None:
    with pytest.raises(ValueError):
        Settings.from_app(None, environ={key: value})
