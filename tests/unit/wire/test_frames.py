"""The frame protocol: length-prefixed msgpack, bounded, never pickle."""

from __future__ import annotations

import pickle
import socket
import struct
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_gpu.errors import FrameError
from celery_gpu.wire.frames import MAX_FRAME, Channel

HEADER = struct.Struct("!I")


def _nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


# -- round trips ----------------------------------------------------------------------------------------


def test_round_trip_of_plain_data(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    message = {
        "t": "run",
        "job": 7,
        "big": 2**63 - 1,
        "neg": -(2**63),
        "pi": 3.141592653589793,
        "tiny": 5e-324,
        "none": None,
        "yes": True,
        "no": False,
        "text": "héllo ✓",
        "empty": "",
        "blob": b"\x00\x01\xff" * 100,
        "nested": {"list": [1, "two", b"three", [None, {"deep": [1.5, {}]}]], "dict": {"a": {"b": {"c": []}}}},
        "headers": {"retries": 0, "eta": None, "argsrepr": "(1, 2)"},
    }
    left.write(message)
    got = right.read()
    assert got == message
    assert type(got["blob"]) is bytes
    assert type(got["text"]) is str
    assert type(got["yes"]) is bool
    assert type(got["pi"]) is float
    assert got["nested"]["list"][2] == b"three"
    assert type(got["nested"]["list"][2]) is bytes


def test_frames_in_both_directions_and_in_order(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    for i in range(50):
        left.write({"seq": i})
    right.write({"t": "ready"})
    assert [right.read()["seq"] for _ in range(50)] == list(range(50))
    assert left.read() == {"t": "ready"}


def test_scalars_and_lists_at_top_level(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    for value in [None, 0, "x", b"y", [1, [2]], 1.25, True]:
        left.write(value)
        got = right.read()
        assert got == value
        assert type(got) is type(value)


def test_bytes_stay_bytes_and_str_stays_str(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    left.write({"body": b"[[1, 2], {}, {}]", "content_type": "application/json"})
    got = right.read()
    assert got["body"] == b"[[1, 2], {}, {}]"
    assert isinstance(got["body"], bytes)
    assert isinstance(got["content_type"], str)


def test_tuples_and_sets_become_lists(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    left.write({"args": (1, 2), "set": {3}, "frozen": frozenset({4})})
    assert right.read() == {"args": [1, 2], "set": [3], "frozen": [4]}


def test_memoryview_body_is_sent_as_bytes(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    left.write({"body": memoryview(b"abc")})
    got = right.read()
    assert got == {"body": b"abc"}
    assert type(got["body"]) is bytes


def test_datetime_header_values_become_iso_strings(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    eta = datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
    naive = datetime(2030, 12, 31, 23, 59, 59)
    plus2 = datetime(2024, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    left.write({"headers": {"eta": eta, "expires": naive, "other": plus2}})
    got = right.read()["headers"]
    assert got == {"eta": "2024-01-02T03:04:05.123456+00:00", "expires": "2030-12-31T23:59:59",
                   "other": "2024-06-01T12:00:00+02:00"}
    assert datetime.fromisoformat(got["eta"]) == eta


def test_odd_objects_are_sent_as_their_repr(pair: tuple[Channel, Channel]) -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    left, right = pair
    left.write({"x": Odd()})
    assert right.read() == {"x": "<odd>"}


def test_default_max_frame_is_one_gib() -> None:
    assert MAX_FRAME == 1 << 30
    a, b = socket.socketpair()
    try:
        assert Channel(a).max_frame == MAX_FRAME
        assert Channel(a).fileno() == a.fileno()
    finally:
        a.close()
        b.close()


def test_close_twice_is_safe() -> None:
    a, b = socket.socketpair()
    chan = Channel(a)
    chan.close()
    chan.close()
    b.close()


# -- limits ---------------------------------------------------------------------------------------------


def test_send_larger_than_max_frame_raises_and_writes_nothing() -> None:
    a, b = socket.socketpair()
    left, right = Channel(a, max_frame=64), Channel(b, max_frame=64)
    try:
        with pytest.raises(FrameError, match="exceeds the maximum of 64"):
            left.write({"body": b"x" * 100})
        assert _nothing_pending(b)
        left.write({"ok": b"x" * 10})  # the channel is still usable afterwards
        assert right.read() == {"ok": b"x" * 10}
    finally:
        left.close()
        right.close()


def test_frame_exactly_at_max_frame_is_accepted() -> None:
    body = msgpack.packb(b"x" * 50, use_bin_type=True)
    a, b = socket.socketpair()
    left, right = Channel(a, max_frame=len(body)), Channel(b, max_frame=len(body))
    try:
        left.write(b"x" * 50)
        assert right.read() == b"x" * 50
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize("announced", [1025, 2**31, 2**32 - 1])
def test_forged_header_is_refused_before_reading_the_body(announced: int, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    right = Channel(b, max_frame=1024)
    reads: list[int] = []
    real_read = Channel._read

    def spy(self: Channel, n: int) -> bytearray:
        reads.append(n)
        return real_read(self, n)

    monkeypatch.setattr(Channel, "_read", spy)
    try:
        a.sendall(HEADER.pack(announced) + b"\x90" * 16)
        with pytest.raises(FrameError, match=f"announces {announced} bytes"):
            right.read()
        assert reads == [HEADER.size]  # only the header was read; no buffer of `announced` bytes was made
    finally:
        a.close()
        right.close()


def test_forged_header_over_default_max_frame() -> None:
    a, b = socket.socketpair()
    right = Channel(b)  # 1 GiB maximum; the header announces 4 GiB - 1
    try:
        a.sendall(HEADER.pack(2**32 - 1))
        with pytest.raises(FrameError, match="more than the maximum"):
            right.read()
    finally:
        a.close()
        right.close()


# -- malformed bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",  # an empty frame is not a value
        b"\xc1",  # the one byte msgpack never uses
        b"\x92\x01",  # array of 2 with one element
        b"\xa5abc",  # truncated str
        b"\x01\x02",  # two values in one frame
        b"\x81\x90\x01",  # a map whose key is a list (unhashable)
        b"\xa2\xff\xfe",  # str that is not UTF-8
        b"\xdd\xff\xff\xff\xff",  # array announcing 4G elements
        b"\x91" * 5000 + b"\xc0",  # nesting deeper than the unpacker's stack
        b"garbage that is not msgpack at all",
    ],
)
def test_garbage_body_is_a_frame_error(body: bytes) -> None:
    a, b = socket.socketpair()
    right = Channel(b)
    try:
        a.sendall(HEADER.pack(len(body)) + body)
        with pytest.raises(FrameError, match="malformed frame"):
            right.read()
    finally:
        a.close()
        right.close()


# -- peer gone ------------------------------------------------------------------------------------------


def test_peer_closed_at_frame_boundary_is_eof(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    left.write({"last": True})
    left.close()
    assert right.read() == {"last": True}
    with pytest.raises(EOFError):
        right.read()


@pytest.mark.parametrize("partial", [b"\x00", b"\x00\x00\x00", HEADER.pack(100), HEADER.pack(100) + b"\x90" * 40])
def test_peer_closed_mid_frame_is_eof(partial: bytes) -> None:
    a, b = socket.socketpair()
    right = Channel(b)
    try:
        a.sendall(partial)
        a.close()
        with pytest.raises(EOFError):
            right.read()
    finally:
        right.close()


def test_peer_shutdown_write_side_is_eof() -> None:
    a, b = socket.socketpair()
    right = Channel(b)
    try:
        a.sendall(HEADER.pack(10) + b"abc")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError):
            right.read()
    finally:
        a.close()
        right.close()


# -- never pickle ---------------------------------------------------------------------------------------


def _write_marker(path: str) -> None:
    Path(path).write_text("unpickled!")


class Armed:
    """Unpickling this runs ``_write_marker(path)``, the harmless stand-in for ``os.system``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _write_marker, (self.path,)


def test_the_pickle_payload_is_really_armed(tmp_path: Path) -> None:
    # control: the payload used below does run code when unpickled (by pickle itself, never by Channel)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Armed(control)))
    assert control.read_text() == "unpickled!"


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_payload_as_frame_body_is_never_unpickled(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "marker"
    payload = pickle.dumps(Armed(marker), protocol=protocol)
    a, b = socket.socketpair()
    right = Channel(b)
    try:
        a.sendall(HEADER.pack(len(payload)) + payload)
        try:
            got = right.read()
        except FrameError:
            pass
        else:  # msgpack may read a prefix of the bytes as plain data; it must be nothing more than that
            assert isinstance(got, (int, float, str, bytes, list, dict, bool, type(None)))
            assert not isinstance(got, Armed)
    finally:
        a.close()
        right.close()
    assert not marker.exists()


def test_pickle_payload_inside_a_frame_stays_bytes(pair: tuple[Channel, Channel], tmp_path: Path) -> None:
    left, right = pair
    marker = tmp_path / "marker"
    payload = pickle.dumps(Armed(marker))
    left.write({"body": payload, "content_type": "application/x-python-serialize"})
    got = right.read()
    assert got["body"] == payload
    assert type(got["body"]) is bytes
    assert not marker.exists()


# -- fuzz -----------------------------------------------------------------------------------------------


@given(data=st.binary(max_size=512), short=st.integers(min_value=0, max_value=8))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bodies_only_raise_frame_or_eof_errors(data: bytes, short: int) -> None:
    # a valid header for len(data) bytes, or one announcing up to 8 more bytes than are sent before the close
    a, b = socket.socketpair()
    right = Channel(b, max_frame=1024)
    try:
        a.sendall(HEADER.pack(len(data) + short) + data)
        a.close()
        try:
            right.read()
        except (FrameError, EOFError):
            pass
        else:
            assert short == 0  # a value is only ever decoded from a complete frame
    finally:
        right.close()


@given(value=st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
))
@settings(max_examples=100, deadline=None)
def test_plain_values_round_trip(value: Any) -> None:
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    try:
        left.write(value)
        assert right.read() == value
    finally:
        left.close()
        right.close()


def test_a_stalled_partial_frame_times_out_instead_of_blocking_forever() -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(0.2)  # the pool sets slots.PIPE_TIMEOUT; a stalled process is then replaced
    try:
        theirs.sendall(struct.pack("!I", 100) + b"x" * 10)  # header for 100 bytes, then nothing more
        with pytest.raises(OSError):  # socket.timeout is an OSError
            Channel(ours).read()
    finally:
        ours.close()
        theirs.close()
