"""Device specs, memory sizes, discovery (with a stub NVML) and the per-process current device."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_gpu import devices
from celery_gpu.devices import DEFAULT_FAKE_MEMORY, Device, current_device, discover
from celery_gpu.errors import CeleryGPUError, DeviceSpecError, NotInDeviceProcess
from celery_gpu.units import parse_memory

GiB = 1024**3


# -- parse_memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (123, 123),
        (16 * GiB, 16 * GiB),
        ("0", 0),
        ("123", 123),
        ("123B", 123),
        ("2GiB", 2 * GiB),
        ("2gib", 2 * GiB),
        ("2GIB", 2 * GiB),
        ("512MB", 512_000_000),
        ("512MiB", 512 * 1024**2),
        ("1.5G", 1_500_000_000),
        ("1.5GiB", 3 * GiB // 2),
        ("4k", 4000),
        ("4KiB", 4096),
        ("1TiB", 1024**4),
        ("2TB", 2 * 1000**4),
        ("  2GiB  ", 2 * GiB),
        ("2 GiB", 2 * GiB),
        ("\t64 MiB\n", 64 * 1024**2),
    ],
)
def test_parse_memory_valid(value: int | str, expected: int) -> None:
    result = parse_memory(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    ["", "   ", "lots", "GiB", "2 lots", "2XB", "2GiBs", "1e3", "2 GiB B", "1.5.0G", "0x10", "- 1", "-1", "-1GiB",
     "-0.5G", "nan", "inf", "2,5GiB", "None"],
)
def test_parse_memory_rejects_bad_strings(value: str) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory(value)


@pytest.mark.parametrize("value", [-1, -(2**40)])
def test_parse_memory_rejects_negative_ints(value: int) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        parse_memory(value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_memory_rejects_bools(value: bool) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory(value)


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from([("", 1), ("KiB", 1024), ("MB", 1000**2),
                                                                  ("GiB", GiB)]))
@settings(max_examples=100, deadline=None)
def test_parse_memory_integer_sizes_are_exact(n: int, unit: tuple[str, int]) -> None:
    suffix, factor = unit
    assert parse_memory(n) == n
    if n * factor < 2**53:  # exact in a float, so no rounding can be blamed on the parser
        assert parse_memory(f"{n}{suffix}") == n * factor


@pytest.mark.parametrize("value", ["9" * 400, "9" * 400 + "GiB"])
def test_parse_memory_huge_number_is_a_value_error(value: str) -> None:
    with pytest.raises(ValueError):
        parse_memory(value)


# -- discover: cpu and fake devices ---------------------------------------------------------------------


def _no_nvml() -> list[Device]:
    raise AssertionError("NVML must not be consulted for this spec")


def test_discover_cpu() -> None:
    (cpu,) = discover("cpu", nvml=_no_nvml)
    assert cpu.kind == "cpu"
    assert cpu.index == 0
    assert cpu.name == "cpu"
    assert cpu.label == "cpu"
    assert cpu.torch == "cpu"
    assert cpu.cuda_visible_devices == ""
    assert cpu.total_memory > 0
    assert cpu.state == {}


@pytest.mark.parametrize("spec", ["CPU", "  cpu  "])
def test_discover_cpu_spec_is_normalised(spec: str) -> None:
    assert [d.kind for d in discover(spec, nvml=_no_nvml)] == ["cpu"]


def test_discover_fake_default_memory() -> None:
    found = discover("fake:4", nvml=_no_nvml)
    assert len(found) == 4
    assert [d.index for d in found] == [0, 1, 2, 3]
    assert {d.kind for d in found} == {"fake"}
    assert [d.name for d in found] == ["fake-0", "fake-1", "fake-2", "fake-3"]
    assert [d.label for d in found] == ["fake:0", "fake:1", "fake:2", "fake:3"]
    assert [d.cuda_visible_devices for d in found] == ["0", "1", "2", "3"]
    assert {d.torch for d in found} == {"cpu"}
    assert DEFAULT_FAKE_MEMORY == 16 * GiB
    assert {d.total_memory for d in found} == {16 * GiB}


def test_discover_fake_with_memory() -> None:
    found = discover("fake:2x8GiB", nvml=_no_nvml)
    assert [(d.label, d.total_memory) for d in found] == [("fake:0", 8 * GiB), ("fake:1", 8 * GiB)]


def test_fake_devices_do_not_share_state() -> None:
    a, b = discover("fake:2")
    a.state["model"] = object()
    assert b.state == {}


@pytest.mark.parametrize("spec", ["fake:0", "fake:x", "fake:", "fake:-1", "fake:2xlots", "fake:2x", "fake:ax8GiB",
                                  "fake:2x-1GiB"])
def test_discover_bad_fake_specs(spec: str) -> None:
    with pytest.raises(DeviceSpecError, match="fake"):
        discover(spec, nvml=_no_nvml)


def test_device_spec_error_is_a_value_error() -> None:
    assert issubclass(DeviceSpecError, ValueError)
    assert issubclass(DeviceSpecError, CeleryGPUError)


# -- discover: CUDA devices through a stub NVML ------------------------------------------------------------

GPU0 = Device(0, "cuda", "NVIDIA Test A", 80 * GiB)
GPU1 = Device(1, "cuda", "NVIDIA Test B", 40 * GiB)


def _two_gpus() -> list[Device]:
    return [Device(0, "cuda", "NVIDIA Test A", 80 * GiB), Device(1, "cuda", "NVIDIA Test B", 40 * GiB)]


def _no_gpus() -> list[Device]:
    return []


def test_discover_all_without_gpus_is_the_cpu() -> None:
    found = discover("all", nvml=_no_gpus)
    assert [(d.kind, d.label) for d in found] == [("cpu", "cpu")]


@pytest.mark.parametrize("spec", ["", "ALL", " all "])
def test_discover_empty_or_all_spellings(spec: str) -> None:
    assert discover(spec, nvml=_two_gpus) == [GPU0, GPU1]


def test_discover_all_with_gpus() -> None:
    found = discover("all", nvml=_two_gpus)
    assert found == [GPU0, GPU1]
    assert [d.label for d in found] == ["cuda:0", "cuda:1"]
    assert [d.cuda_visible_devices for d in found] == ["0", "1"]
    # each process sees only its own GPU, which CUDA then numbers 0
    assert {d.torch for d in found} == {"cuda:0"}


@pytest.mark.parametrize(
    ("spec", "labels"),
    [("0,1", ["cuda:0", "cuda:1"]), ("1", ["cuda:1"]), ("0", ["cuda:0"]), ("1,0", ["cuda:1", "cuda:0"]),
     (" 0 , 1 ", ["cuda:0", "cuda:1"]), ("1,", ["cuda:1"])],
)
def test_discover_gpu_list(spec: str, labels: list[str]) -> None:
    found = discover(spec, nvml=_two_gpus)
    assert [d.label for d in found] == labels
    assert all(d.kind == "cuda" for d in found)


def test_discover_missing_gpu_names_what_exists() -> None:
    with pytest.raises(DeviceSpecError) as info:
        discover("5", nvml=_two_gpus)
    message = str(info.value)
    assert "[5]" in message
    assert "0,1" in message


def test_discover_missing_gpu_without_any_gpu() -> None:
    with pytest.raises(DeviceSpecError, match="no GPU"):
        discover("0", nvml=_no_gpus)


def test_discover_partly_missing_gpu_list() -> None:
    with pytest.raises(DeviceSpecError, match=r"\[2\]"):
        discover("0,2", nvml=_two_gpus)


@pytest.mark.parametrize("spec", ["0,0", "1,0,1"])
def test_discover_duplicate_indexes(spec: str) -> None:
    with pytest.raises(DeviceSpecError, match="once"):
        discover(spec, nvml=_two_gpus)


@pytest.mark.parametrize("spec", ["a,b", "gpu0", "cuda:0", "0;1", "0.5"])
def test_discover_unknown_spec(spec: str) -> None:
    with pytest.raises(DeviceSpecError, match="unknown device spec"):
        discover(spec, nvml=_two_gpus)


def test_discover_list_of_nothing() -> None:
    with pytest.raises(DeviceSpecError):
        discover(",", nvml=_two_gpus)


# -- Device -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [GPU1, Device(0, "cpu", "cpu", 1234), Device(3, "fake", "fake-3", 8 * GiB)])
def test_wire_round_trip(device: Device) -> None:
    wire = device.to_wire()
    assert wire == {"index": device.index, "kind": device.kind, "name": device.name,
                    "total_memory": device.total_memory}
    back = Device.from_wire(wire)
    assert back == device
    assert back is not device
    assert (back.label, back.torch, back.cuda_visible_devices) == (
        device.label, device.torch, device.cuda_visible_devices)


def test_wire_form_leaves_state_behind() -> None:
    device = Device(2, "fake", "fake-2", GiB)
    device.state["model"] = object()
    wire = device.to_wire()
    assert "state" not in wire
    back = Device.from_wire(wire)
    assert back.state == {}
    assert back == device  # state does not take part in equality


def test_from_wire_coerces_types() -> None:
    back = Device.from_wire({"index": "1", "kind": "cuda", "name": "x", "total_memory": "1024"})
    assert back == Device(1, "cuda", "x", 1024)


# -- current_device -----------------------------------------------------------------------------------


def test_current_device_outside_a_device_process() -> None:
    assert devices._current is None
    with pytest.raises(NotInDeviceProcess, match="device process"):
        current_device()


def test_current_device_inside_a_device_process() -> None:
    device = Device(1, "fake", "fake-1", GiB)
    devices.set_current(device)
    try:
        assert current_device() is device
    finally:
        devices.set_current(None)
    with pytest.raises(NotInDeviceProcess):
        current_device()


def test_not_in_device_process_is_a_runtime_error() -> None:
    assert issubclass(NotInDeviceProcess, RuntimeError)
