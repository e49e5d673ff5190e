"""Long byte strings through shared memory (memfd + SCM_RIGHTS): equal on arrival, segment reused and grown,
nothing in /dev/shm, lying references refused, and a dead peer leaves nothing behind."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pytest

from celery_gpu.errors import FrameError
from celery_gpu.wire.frames import SHM_THRESHOLD, Channel

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd on this platform")


def exchange(writer: Channel, reader: Channel, obj: object) -> object:
    """Write on a thread (a big frame could fill the socket buffer) and read here."""
    t = threading.Thread(target=writer.write, args=(obj,))
    t.start()
    got = reader.read()
    t.join(10)
    return got


def memfds(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "celery-gpu-frames" in target:
            out.append(target)
    return out


def test_long_strings_arrive_equal_through_shared_memory(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    body = os.urandom(5 * 1024 * 1024)
    frame = {"t": "run", "body": body, "small": b"x" * 10, "items": [{"body": body[:SHM_THRESHOLD]}]}
    assert exchange(left, right, frame) == frame
    assert left.shm_bytes == len(body) + SHM_THRESHOLD, "both long strings went through shared memory"


def test_long_text_travels_as_text(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    text = "é😀x" * (SHM_THRESHOLD // 2)
    frame = {"body": text, "retval": [text[:SHM_THRESHOLD]]}
    assert exchange(left, right, frame) == frame
    assert left.shm_bytes > 0


def test_the_segment_is_reused_and_grown(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    for size in (100_000, 200_000, 3 * 1024 * 1024, 150_000):
        blob = os.urandom(size)
        assert exchange(left, right, {"b": blob}) == {"b": blob}
        assert exchange(right, left, {"r": blob[::-1]}) == {"r": blob[::-1]}
    # one segment per direction, seen by writer and reader, each holding its fd and mmap's duplicate of it;
    # the grown segments replaced the first ones
    assert len(memfds(os.getpid())) == 8


def test_small_frames_do_not_use_shared_memory(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    assert exchange(left, right, {"b": b"x" * (SHM_THRESHOLD - 1)}) == {"b": b"x" * (SHM_THRESHOLD - 1)}
    assert left.shm_bytes == 0 and not memfds(os.getpid())


def test_nothing_in_dev_shm() -> None:
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    exchange(left, right, {"b": os.urandom(2 * 1024 * 1024)})
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert after == before
    left.close()
    right.close()
    assert not memfds(os.getpid())


def test_a_reference_outside_the_segment_is_refused(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    exchange(left, right, {"b": os.urandom(SHM_THRESHOLD)})  # the reader now has a 1 MiB segment
    lie = msgpack.packb({"b": msgpack.ExtType(1, struct.pack("!QQ", 1 << 20, 10))}, use_bin_type=True)
    left.sock.sendall(struct.pack("!I", len(lie)) + lie)
    with pytest.raises(FrameError, match="outside the segment"):
        right.read()


def test_a_reference_without_a_segment_is_refused(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    lie = msgpack.packb({"b": msgpack.ExtType(1, struct.pack("!QQ", 0, 10))}, use_bin_type=True)
    left.sock.sendall(struct.pack("!I", len(lie)) + lie)
    with pytest.raises(FrameError, match="without a segment"):
        right.read()


def test_the_total_is_bounded_by_max_frame() -> None:
    a, b = socket.socketpair()
    left = Channel(a, max_frame=1024 * 1024)
    with pytest.raises(FrameError, match="exceeds the maximum"):
        left.write({"b": b"x" * (2 * 1024 * 1024)})
    left.close()
    b.close()


CHILD = """
import os, socket, sys
from celery_gpu.wire.frames import Channel
chan = Channel(socket.socket(fileno=int(sys.argv[1])))
msg = chan.read()
chan.write({"echo": msg["b"]})
os.kill(os.getpid(), 9)  # dies holding both segments
"""


def test_a_killed_peer_leaves_nothing_behind(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    chan = Channel(ours)
    blob = os.urandom(3 * 1024 * 1024)
    chan.write({"b": blob})
    assert chan.read() == {"echo": blob}
    proc.wait(10)
    assert proc.returncode == -9
    chan.close()
    assert not memfds(os.getpid())
    assert not [n for n in (os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []) if "celery" in n]


def landing_pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    return Channel(a), Channel(b, landing=True)


def test_landing_gives_views_of_one_reused_buffer() -> None:
    left, right = landing_pair()
    try:
        first = os.urandom(2 * 1024 * 1024)
        got = exchange(left, right, {"body": first})
        assert isinstance(got["body"], memoryview) and bytes(got["body"]) == first
        base = got["body"].obj
        del got
        second = os.urandom(1024 * 1024)
        got = exchange(left, right, {"body": second, "more": [second[:SHM_THRESHOLD]]})
        assert bytes(got["body"]) == second and bytes(got["more"][0]) == second[:SHM_THRESHOLD]
        assert got["body"].obj is base, "nothing viewed the buffer any more: reused"
    finally:
        left.close()
        right.close()


def test_a_kept_view_is_never_overwritten() -> None:
    left, right = landing_pair()
    try:
        first = os.urandom(1024 * 1024)
        kept = exchange(left, right, {"body": first})["body"]  # a task that keeps its input
        second = os.urandom(1024 * 1024)
        got = exchange(left, right, {"body": second})
        assert bytes(got["body"]) == second
        assert bytes(kept) == first, "the kept view still shows its own frame"
        assert got["body"].obj is not kept.obj
    finally:
        left.close()
        right.close()


def test_a_frame_larger_than_the_buffer_spills_into_a_new_one() -> None:
    left, right = landing_pair()
    try:
        parts = [os.urandom(700 * 1024) for _ in range(3)]  # 2.1 MiB in one frame, buffer starts at 1 MiB
        got = exchange(left, right, {"items": [{"body": p} for p in parts]})
        assert [bytes(i["body"]) for i in got["items"]] == parts
    finally:
        left.close()
        right.close()


def test_a_forged_shared_memory_frame_with_a_pickle_body_runs_nothing(tmp_path: Path) -> None:
    """A frame that passes a pickle payload through shared memory (as if the worker had) is refused by the
    device process's decoder (accept_content), and the payload's __reduce__ never runs."""
    import pickle

    from celery import Celery

    from celery_gpu.device.context import DeviceContext
    from celery_gpu.device.tracing import run_task

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (open, (str(marker), "w"))

    app = Celery("forged", broker="memory://", backend="cache+memory://", set_as_current=False)

    @app.task(name="forged.t")
    def t(x: object) -> object:
        return x

    left, right = landing_pair()
    try:
        body = pickle.dumps(((Evil(),), {}, {})) + b"\0" * SHM_THRESHOLD  # long: through shared memory
        msg = exchange(left, right, {"t": "run", "job": 1, "name": "forged.t", "uuid": "forged-1", "request": {},
                                     "body": body, "content_type": "application/x-python-serialize",
                                     "content_encoding": "binary"})
        assert isinstance(msg, dict) and isinstance(msg["body"], memoryview)
        done = run_task(DeviceContext(), app, msg, "forged@test")
    finally:
        left.close()
        right.close()
    assert done["failed"] and done["exc"]["type"] == "MalformedTaskMessage"
    assert "ContentDisallowed" in done["exc"]["message"] or "untrusted" in done["exc"]["message"]
    assert not marker.exists()


# -- one huge frame does not keep its memory for good (issue 17, item 6) --------------------------------------------


def _resident(fd: int) -> int:
    """Bytes of a memfd that hold pages now (holes punched out do not count)."""
    return os.fstat(fd).st_blocks * 512


def test_a_huge_frames_pages_are_given_back_once_read(pair: tuple[Channel, Channel]) -> None:
    from celery_gpu.wire.frames import RETAIN

    left, right = pair
    huge = os.urandom(RETAIN + (24 << 20))
    assert exchange(left, right, {"body": huge}) == {"body": huge}
    assert left._out is not None
    fd = left._out.fd
    assert _resident(fd) >= len(huge)
    left.trim()  # the reader answered: it has copied the body out
    assert _resident(fd) <= RETAIN
    # The segment still works, pages fault in again, and the bytes kept are the bytes written.
    again = os.urandom(RETAIN + (8 << 20))
    assert exchange(left, right, {"body": again, "small": huge[:SHM_THRESHOLD]}) == {
        "body": again, "small": huge[:SHM_THRESHOLD]}
    assert left._out.fd == fd, "same segment: no new descriptor to send"
    # Steady traffic at or below RETAIN keeps its pages: trimming then costs nothing.
    left.trim()
    steady = os.urandom(RETAIN // 2)
    assert exchange(left, right, {"body": steady}) == {"body": steady}
    before = _resident(fd)
    left.trim()
    assert _resident(fd) == before


def test_a_huge_landing_buffer_is_dropped_after_use() -> None:
    from celery_gpu.wire.frames import RETAIN

    left, right = landing_pair()
    try:
        _landing_dropped(left, right, RETAIN)
    finally:
        left.close()
        right.close()


def _landing_dropped(left: Channel, right: Channel, retain: int) -> None:
    small = os.urandom(SHM_THRESHOLD)
    exchange(left, right, {"body": small})
    kept = right._landing
    right.trim_landing()
    assert right._landing is kept, "a small landing buffer is reused"
    huge = os.urandom(retain + (8 << 20))
    got = exchange(left, right, {"body": huge})
    assert isinstance(got, dict) and got["body"] == huge
    del got
    right.trim_landing()
    assert right._landing is None, "a huge one goes"
