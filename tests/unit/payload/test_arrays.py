"""The arrays serializer: exact round trips, zero-copy views, strict limits, lying headers, never pickle."""

from __future__ import annotations

import enum
import pickle
import struct
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads
from kombu.serialization import prepare_accept_content, registry

from celery_gpu.errors import ArrayDecodeError, ArraySerializationError, PayloadTooLarge
from celery_gpu.payload import arrays
from celery_gpu.payload.arrays import CONTENT_TYPE, NAME, dumps, loads

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]
LAYOUTS = ["C", "F", "strided", "0-d", "empty", "big-endian"]
PRELUDE = struct.Struct("<4sB3xQ")


@pytest.fixture(autouse=True)
def _default_limit() -> Iterator[None]:
    arrays.set_max_payload(None)
    yield
    arrays.set_max_payload(None)


@pytest.fixture
def accept() -> set[str]:
    arrays.register()
    return prepare_accept_content([NAME])  # type: ignore[no-any-return]


def make(dtype: str, layout: str, seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((6, 5)) * 100).astype(dtype)  # bool: nonzero -> True
    if dtype.startswith("complex"):
        base = base + 1j * base[::-1]
    arr = {
        "C": base,
        "F": np.asfortranarray(base),
        "strided": base[::2, 1::2],
        "0-d": np.array(base[2, 3]),
        "empty": base[:0],
        "big-endian": base.astype(base.dtype.newbyteorder(">")),
    }[layout]
    return arr


def assert_same(out: Any, arr: np.ndarray[Any, Any]) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.dtype.str == arr.dtype.str
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


# -- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(dtype: str, layout: str) -> None:
    arr = make(dtype, layout)
    out = loads(dumps(arr))
    assert_same(out, arr)
    if layout == "F":
        assert out.flags.f_contiguous and not out.flags.c_contiguous  # sent in F order, no copy on either side
    assert out.flags.aligned


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_through_kombu(dtype: str, layout: str, accept: set[str]) -> None:
    arr = make(dtype, layout)
    content_type, encoding, body = kombu_dumps(([arr], {"x": arr}, {}), serializer=NAME)
    assert (content_type, encoding) == (CONTENT_TYPE, "binary")
    args, kwargs, _ = kombu_loads(body, content_type, encoding, accept=accept)
    assert_same(args[0], arr)
    assert_same(kwargs["x"], arr)


def test_numpy_scalars_come_back_as_numpy_scalars() -> None:
    values = [np.float32(1.5), np.int64(-3), np.bool_(True), np.complex128(1 - 2j), np.float16(0.25)]
    out = loads(dumps(values))
    for got, sent in zip(out, values, strict=True):
        assert type(got) is type(sent) and got == sent


def test_nested_values() -> None:
    a, b = make("float32", "C"), make("int64", "F")
    value = {"batch": [a, {"mask": b, "meta": (1, 2.5, "x", None, True, b"\x00\xff")}], "n": 2**64 - 1, "m": -2**63}
    out = loads(dumps(value))
    assert_same(out["batch"][0], a)
    assert_same(out["batch"][1]["mask"], b)
    assert out["batch"][1]["meta"] == [1, 2.5, "x", None, True, b"\x00\xff"]  # tuples come back as lists
    assert (out["n"], out["m"]) == (2**64 - 1, -2**63)


def test_the_same_array_twice_and_many_arrays() -> None:
    a = make("float64", "C")
    many = [make("int16", "C", seed=i)[: i % 6] for i in range(100)]
    out = loads(dumps([a, a, *many]))
    assert_same(out[0], a)
    assert_same(out[1], a)
    for got, sent in zip(out[2:], many, strict=True):
        assert_same(got, sent)


class Colour(enum.IntEnum):
    RED = 1


def test_subclasses_of_plain_types_go_as_the_plain_type() -> None:
    class Sig(dict[str, Any]):
        pass

    out = loads(dumps([Colour.RED, np.str_("s"), Sig(task="t", args=[1]), bytearray(b"ab")]))
    assert out == [1, "s", {"task": "t", "args": [1]}, b"ab"]
    assert type(out[0]) is int and type(out[1]) is str and type(out[2]) is dict


def test_array_subclasses_go_as_plain_arrays(tmp_path: Path) -> None:
    mapped = np.memmap(tmp_path / "m", dtype="<i4", mode="w+", shape=(3, 2))
    mapped[:] = 7
    (out,) = loads(dumps([mapped]))
    assert type(out) is np.ndarray and out.shape == (3, 2) and (out == 7).all()


def test_plain_values_without_arrays_end_after_the_header() -> None:
    data = dumps({"a": [1, 2]})
    assert len(data) == PRELUDE.size + len(msgpack.packb({"a": [1, 2]}))


# -- zero copy -----------------------------------------------------------------------------------------


def test_decoded_arrays_are_aligned_read_only_views_on_bytes() -> None:
    value = {"a": make("complex128", "C"), "b": make("bool", "0-d"), "c": make("float32", "F")}
    data = dumps(value)
    raw = np.frombuffer(data, np.uint8)
    out = loads(data)
    for key, arr in out.items():
        assert np.shares_memory(arr, raw)
        assert (arr.ctypes.data - raw.ctypes.data) % arrays.ALIGN == 0
        assert arr.flags.aligned and not arr.flags.writeable
        assert_same(arr, value[key])


def test_decoded_arrays_on_a_bytearray_are_writable_views() -> None:
    buf = bytearray(dumps([make("float64", "C")]))
    (arr,) = loads(buf)
    arr[0, 0] = 42.0
    assert loads(buf)[0][0, 0] == 42.0


def test_a_memoryview_slice_is_accepted() -> None:
    data = b"junk" + dumps([make("int32", "C")])
    assert_same(loads(memoryview(data)[4:])[0], make("int32", "C"))


# -- torch ---------------------------------------------------------------------------------------------


def test_torch_tensors_arrive_as_numpy() -> None:
    torch = pytest.importorskip("torch")
    t32 = torch.randn(4, 3)
    t64 = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    transposed = t64.T  # not C-contiguous
    grad = torch.ones(3, requires_grad=True) * 2
    out = loads(dumps({"a": t32, "b": t64, "t": transposed, "g": grad, "s": torch.tensor(7)}))
    assert out["a"].dtype == np.float32 and np.array_equal(out["a"], t32.numpy())
    assert out["b"].dtype == np.int64 and np.array_equal(out["b"], t64.numpy())
    assert np.array_equal(out["t"], transposed.numpy()) and out["t"].shape == (4, 3)
    assert np.array_equal(out["g"], [2, 2, 2])
    assert out["s"].shape == () and out["s"] == 7


def test_tensors_torch_gives_tensors() -> None:
    torch = pytest.importorskip("torch")
    sent = {"a": torch.randn(2, 3), "t": torch.arange(6).reshape(2, 3).T, "big": make("float32", "big-endian"),
            "b": torch.tensor([True, False]), "scalar": np.float32(2)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" warning from torch
        out = loads(dumps(sent), tensors="torch")
    assert isinstance(out["a"], torch.Tensor) and torch.equal(out["a"], sent["a"])
    assert torch.equal(out["t"], sent["t"])
    assert out["big"].dtype == torch.float32 and np.array_equal(out["big"].numpy(), sent["big"])
    assert out["b"].dtype == torch.bool
    assert type(out["scalar"]) is np.float32


def test_tensors_torch_shares_a_writable_buffer() -> None:
    torch = pytest.importorskip("torch")
    buf = bytearray(dumps([torch.arange(4.0)]))
    (t,) = loads(buf, tensors="torch")
    t[0] = 9.0
    assert loads(buf)[0][0] == 9.0


class FakeCupyArray:
    """Duck-typed like a CuPy array (its type's module starts with ``cupy``): ``.get()`` copies to the host."""

    def __init__(self, host: np.ndarray[Any, Any]) -> None:
        self.host = host

    def get(self) -> np.ndarray[Any, Any]:
        return self.host.copy()


FakeCupyArray.__module__ = "cupy._core.core"


def test_cupy_arrays_arrive_as_numpy() -> None:
    arr = make("float32", "F")
    assert_same(loads(dumps({"x": FakeCupyArray(arr)}))["x"], arr)


def test_real_cupy_arrays_arrive_as_numpy() -> None:
    cupy = pytest.importorskip("cupy")
    arr = make("float32", "C")
    assert_same(loads(dumps([cupy.asarray(arr)]))[0], arr)


def test_bfloat16_is_refused_with_advice() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(ArraySerializationError, match=r"^\[0\]\['w'\]: torch.bfloat16 .*t.float\(\)"):
        dumps([{"w": torch.ones(2, dtype=torch.bfloat16)}])


def test_tensors_must_be_numpy_or_torch() -> None:
    with pytest.raises(ValueError, match="tensors"):
        loads(dumps(1), tensors="jax")  # type: ignore[arg-type]


# -- refused values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "match"), [
    (([{"image": {1, 2}}], {}, {"callbacks": None}), r"^args\[0\]\['image'\]: cannot serialize <class 'set'>"),
    (((), {"when": object()}, {"callbacks": None}), r"^kwargs\['when'\]: cannot serialize <class 'object'>"),
    ({"a": np.array([object()])}, r"^\['a'\]: dtype object is not supported"),
    ([np.zeros(2, dtype=[("x", "f4")])], r"^\[0\]: dtype .* is not supported"),
    ([np.array(["2024-01-01"], dtype="datetime64[D]")], r"^\[0\]: dtype datetime64\[D\] is not supported"),
    ([np.array(["abc"])], r"^\[0\]: dtype <U3 is not supported"),
    ([np.zeros(2, dtype=np.longdouble)], r"^\[0\]: dtype float128 is not supported"),
    ([np.datetime64("2024-01-01")], r"^\[0\]: dtype datetime64\[D\] is not supported"),
    ([np.ma.masked_array([1, 2], mask=[0, 1])], r"^\[0\]: masked arrays are not supported"),
    ([2**64], r"^\[0\]: int 18446744073709551616 does not fit in 64 bits"),
    ([-(2**63) - 1], r"does not fit in 64 bits"),
    ({(1, 2): "x"}, r"^value: dict key \(1, 2\) is not a str"),
    (3j, r"^value: cannot serialize <class 'complex'>"),
])
def test_unsupported_values_name_the_path(value: Any, match: str) -> None:
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray) and value[0].dtype == np.longdouble \
            and np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("long double is float64 on this platform")
    with pytest.raises(ArraySerializationError, match=match):
        dumps(value)


def test_nesting_is_bounded_and_cycles_are_caught() -> None:
    deep: list[Any] = []
    for _ in range(arrays.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ArraySerializationError, match="nested deeper than 64"):
        dumps(deep)
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ArraySerializationError, match="nested deeper"):
        dumps(cycle)


def test_kombu_wraps_encode_errors() -> None:
    arrays.register()
    with pytest.raises(EncodeError) as info:
        kombu_dumps({"s": {1}}, serializer=NAME)
    assert isinstance(info.value.args[0], ArraySerializationError)


# -- payload limit -------------------------------------------------------------------------------------


def test_payload_too_large_before_anything_is_copied() -> None:
    huge = np.broadcast_to(np.zeros(1, np.float64), (2**31,))  # 16 GiB, zero strides: copying it would not fit
    with pytest.raises(PayloadTooLarge, match=r"maximum of 1073741824 .*CELERY_GPU_MAX_PAYLOAD"):
        dumps({"x": huge})


def test_payload_limit_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    arr = np.zeros(1000, np.uint8)
    assert loads(dumps(arr, max_payload=2000)).shape == (1000,)
    with pytest.raises(PayloadTooLarge):
        dumps(arr, max_payload=1000)
    with pytest.raises(PayloadTooLarge):
        dumps(b"x" * 2000, max_payload=1000)  # the header counts too
    monkeypatch.setenv("CELERY_GPU_MAX_PAYLOAD", "1KiB")
    assert arrays.get_max_payload() == 1024
    with pytest.raises(PayloadTooLarge):
        dumps(arr)
    arrays.set_max_payload("1MiB")  # the setter wins over the environment
    assert dumps(arr)
    arrays.set_max_payload(None)
    monkeypatch.delenv("CELERY_GPU_MAX_PAYLOAD")
    assert arrays.get_max_payload() == arrays.DEFAULT_MAX_PAYLOAD


# -- lying and malformed payloads ----------------------------------------------------------------------


def forge(meta: Any, tail: bytes = b"\x00" * 64, code: int = 1, version: int = 1) -> bytes:
    """A payload whose only value is one array with header ``meta``, followed at offset 0 by ``tail``."""
    header = msgpack.packb([msgpack.ExtType(code, msgpack.packb(meta))])
    head = PRELUDE.pack(b"CGPA", version, len(header)) + header
    return head + bytes(-len(head) % 64) + tail


def test_forge_makes_a_valid_payload() -> None:
    assert np.array_equal(loads(forge(["<f8", [8], "C", 0, 64]))[0], np.zeros(8))


@pytest.mark.parametrize(("data", "match"), [
    (forge(["<f8", [8], "C", 0, 60]), "nbytes 60 does not match"),
    (forge(["<f8", [2**62, 2**62], "C", 0, 0]), "too large"),
    (forge(["<f8", [0, 2**62, 2**62], "C", 0, 0]), "too large"),
    (forge(["<f8", [2**40], "C", 0, 2**43]), "runs past the end"),
    (forge(["<f8", [9], "C", 0, 72]), "runs past the end"),
    (forge(["<f8", [1], "C", 64, 8]), "runs past the end"),
    (forge(["|O", [1], "C", 0, 8]), "dtype '|O' is not allowed"),
    (forge(["<M8[ns]", [1], "C", 0, 8]), "not allowed"),
    (forge(["|V8", [1], "C", 0, 8]), "not allowed"),
    (forge(["<f16", [1], "C", 0, 16]), "not allowed"),
    (forge([["<f8"], [1], "C", 0, 8]), "not allowed"),
    (forge(["<f8", [-1], "C", 0, -8]), "bad shape"),
    (forge(["<f8", [True], "C", 0, 8]), "bad shape"),
    (forge(["<f8", [1.0], "C", 0, 8]), "bad shape"),
    (forge(["<f8", [1] * 33, "C", 0, 8]), "bad shape"),
    (forge(["<f8", 8, "C", 0, 64]), "bad shape"),
    (forge(["<f8", [1], "K", 0, 8]), "bad order"),
    (forge(["<f8", [1], "C", 8, 8]), "bad offset"),
    (forge(["<f8", [1], "C", -64, 8]), "bad offset"),
    (forge(["<f8", [1], "C", 0]), "not \\[dtype, shape, order, offset, nbytes\\]"),
    (forge({"dtype": "<f8"}), "not \\[dtype"),
    (forge(["<f8", [1], "C", 0, 8], code=99), "unknown extension type 99"),
    (forge(["<f8", [1], "C", 0, 8], code=2), "a scalar with shape"),
    (forge(["<f8", [1], "C", 0, 8], version=2), "unsupported .* version 2"),
    (b"CGPA\x01\x00\x00\x00" + struct.pack("<Q", 2**40) + b"\x90", "header of 1099511627776 bytes runs past"),
    (b"CGPA\x01", "shorter than the 16-byte prelude"),
    (b"GIF89a" + bytes(20), "not a celery-gpu-arrays payload"),
    (PRELUDE.pack(b"CGPA", 1, 6) + b"\xdb\xff\xff\xff\xff\x00", "malformed payload"),  # str of 4 GiB claimed
    (PRELUDE.pack(b"CGPA", 1, 6) + b"\xdd\xff\xff\xff\xff\x00", "malformed payload"),  # array of 4G items claimed
    (PRELUDE.pack(b"CGPA", 1, 2) + b"\xa1\xff", "malformed payload"),  # bad UTF-8
    (PRELUDE.pack(b"CGPA", 1, 4) + b"\x81\x91\x00\x00", "malformed payload"),  # unhashable key
    (PRELUDE.pack(b"CGPA", 1, 3) + b"\x91\x00\x00", "malformed payload"),  # trailing bytes in the header
    (PRELUDE.pack(b"CGPA", 1, 100_000) + b"\x91" * 100_000, "malformed payload"),  # nested too deep
])
def test_lying_payloads_are_rejected_before_allocating(data: bytes, match: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ArrayDecodeError, match=match):
            loads(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_truncated_payload_is_rejected() -> None:
    data = dumps({"a": make("float64", "C"), "b": make("int8", "C")})
    for cut in (len(data) - 1, len(data) - 40, 100, 17, 3):
        with pytest.raises(ArrayDecodeError):
            loads(data[:cut])


def test_not_bytes_is_rejected() -> None:
    with pytest.raises(ArrayDecodeError, match="expected a bytes-like payload"):
        loads("CGPA")  # type: ignore[arg-type]


def test_kombu_wraps_decode_errors(accept: set[str]) -> None:
    with pytest.raises(DecodeError) as info:
        kombu_loads(b"not ours", CONTENT_TYPE, "binary", accept=accept)
    assert isinstance(info.value.args[0], ArrayDecodeError)


# -- fuzzing -------------------------------------------------------------------------------------------

SAMPLES = [
    dumps({"a": make("float32", "F"), "b": [1, "x", None, b"\x01"], "c": make("bool", "0-d")}),
    dumps([make("complex128", "big-endian"), np.float16(1), make("uint64", "empty")]),
    dumps({"plain": [1.5, True, {"k": "v"}]}),
]


def loads_or_decode_error(data: bytes) -> None:
    try:
        loads(data)
    except ArrayDecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | st.binary(max_size=256).map(lambda b: b"CGPA\x01\x00\x00\x00" + b))
def test_fuzz_random_bytes(data: bytes) -> None:
    loads_or_decode_error(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=8),
       st.integers(0, 10**6) | st.none())
def test_fuzz_mutated_payloads(sample: bytes, flips: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(sample)
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    if cut is not None:
        del data[cut % len(data):]
    loads_or_decode_error(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.integers(0, 200), st.binary(min_size=1, max_size=16))
def test_fuzz_overwritten_header_bytes(sample: bytes, pos: int, junk: bytes) -> None:
    # bytes overwritten in the prelude and header, where lengths, dtypes and shapes live
    data = bytearray(sample)
    data[pos:pos + len(junk)] = junk
    loads_or_decode_error(bytes(data))


leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
          | st.text(max_size=8) | st.binary(max_size=8)
          | hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))


@settings(max_examples=100, deadline=None)
@given(st.recursive(leaves, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids,
                                                                                      max_size=4), max_leaves=10))
def test_fuzz_round_trip(value: Any) -> None:
    def same(a: Any, b: Any) -> None:
        if isinstance(b, np.ndarray):
            assert_same(a, b)
        elif isinstance(b, (list, tuple)):
            assert isinstance(a, list) and len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                same(x, y)
        elif isinstance(b, dict):
            assert isinstance(a, dict) and a.keys() == b.keys()
            for k in b:
                same(a[k], b[k])
        else:
            assert a == b and type(a) is type(b)

    same(loads(dumps(value)), value)


# -- accept_content and pickle -------------------------------------------------------------------------


def test_registration_is_idempotent() -> None:
    arrays.register()
    arrays.register()
    assert registry.name_to_type[NAME] == CONTENT_TYPE
    assert registry.type_to_name[CONTENT_TYPE] == NAME


def test_accept_content_stays_strict(accept: set[str]) -> None:
    data = dumps([make("float32", "C")])
    with pytest.raises(ContentDisallowed):
        kombu_loads(data, CONTENT_TYPE, "binary", accept=prepare_accept_content(["json"]))
    with pytest.raises(ContentDisallowed):
        kombu_loads(pickle.dumps([1]), "application/x-python-serialize", "binary", accept=accept)


def _write_marker(path: str) -> None:
    Path(path).write_text("unpickled!")


class Armed:
    """Unpickling this runs ``_write_marker(path)``, the harmless stand-in for ``os.system``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _write_marker, (self.path,)


def test_the_pickle_payload_is_really_armed(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Armed(control)))
    assert control.read_text() == "unpickled!"


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_payload_is_rejected_and_never_run(tmp_path: Path, protocol: int, accept: set[str]) -> None:
    marker = tmp_path / "marker"
    payload = pickle.dumps({"x": Armed(marker)}, protocol=protocol)
    with pytest.raises(ArrayDecodeError, match="not a celery-gpu-arrays payload"):
        loads(payload)
    with pytest.raises(DecodeError):
        kombu_loads(payload, CONTENT_TYPE, "binary", accept=accept)
    assert not marker.exists()


# -- Celery end to end (in-memory transport) -----------------------------------------------------------


def test_a_celery_task_message_carries_arrays(make_app: Callable[..., Any]) -> None:
    arrays.register()
    app = make_app(broker_url="memory://", task_serializer=NAME, accept_content=[NAME])
    image = make("uint8", "C")
    app.send_task("resize", args=(image,), kwargs={"scale": np.float32(0.5)}, queue="arrays-test")
    with app.connection_for_read() as conn:
        message = conn.SimpleQueue("arrays-test").get(timeout=5)
        assert message.content_type == CONTENT_TYPE
        assert message._raw["properties"]["body_encoding"] == "base64"  # virtual transports (Redis too) do this
        args, kwargs, embed = message.decode()
    assert_same(args[0], image)
    assert kwargs == {"scale": np.float32(0.5)} and "callbacks" in embed


# -- speed (printed with -s, never asserted) -----------------------------------------------------------


def test_print_throughput() -> None:
    arr = np.ones(16 << 20, np.float32)  # 64 MiB
    t0 = time.perf_counter()
    data = dumps(arr)
    t1 = time.perf_counter()
    out = loads(data)
    t2 = time.perf_counter()
    assert out.shape == arr.shape
    gb = arr.nbytes / 1e9
    print(f"\narrays: 64 MiB float32: dumps {gb / (t1 - t0):.1f} GB/s; loads {(t2 - t1) * 1e6:.0f} us (a view)")


def test_json_like_values_kombu_json_also_carries() -> None:
    import datetime
    import decimal
    import uuid

    value = {
        "when": datetime.datetime(2026, 11, 24, 13, 5, 7, 123456, tzinfo=datetime.timezone.utc),
        "naive": datetime.datetime(2026, 1, 2, 3, 4, 5), "day": datetime.date(2026, 2, 3),
        "at": datetime.time(4, 5, 6), "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "price": decimal.Decimal("10.50"), 1: "int key", None: "none key", 2.5: "float key",
    }
    out = loads(dumps(value))
    assert out == {**{k: v for k, v in value.items() if isinstance(k, str)},
                   "1": "int key", "null": "none key", "2.5": "float key"}, "keys become str as in JSON"
    assert isinstance(out["price"], decimal.Decimal) and str(out["price"]) == "10.50"


@pytest.mark.parametrize("code", [3, 4, 5, 6, 7])
def test_a_malformed_plain_value_is_a_named_decode_error(code: int) -> None:
    import msgpack

    good = dumps([1])
    header = msgpack.packb([msgpack.ExtType(code, b"\xff\xfe not a value")], use_bin_type=True)
    forged = good[:8] + len(header).to_bytes(8, "little") + header
    with pytest.raises(ArrayDecodeError):
        loads(forged)
