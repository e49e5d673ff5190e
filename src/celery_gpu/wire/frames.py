"""Frames on the pipe between the worker and its device processes: a 4-byte length, then msgpack.

No pickle: a frame decodes to plain data (dicts, lists, str, bytes, numbers) or raises :class:`FrameError`.
The length is checked against a maximum before anything is allocated for the body.

Long byte strings (task bodies, results: ``shm_threshold`` bytes and more) do not go through the socket. Each
side writes them into a shared-memory segment of its own — a Linux ``memfd``: no name, nothing in ``/dev/shm``,
reachable only through its file descriptor — and the frame carries ``(offset, length)`` references. A segment
is created once and grown when needed; its descriptor goes to the other side with ``SCM_RIGHTS``, attached to
the first frame that uses it. The reader copies each referenced string out (one memory copy, instead of two
through the kernel). A side writes its next frame only after the other side answered the previous one, so a
segment is never overwritten while it is read. When either process dies, however it dies, the kernel frees the
memory with its last descriptor: nothing is left behind.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct
from datetime import datetime
from typing import Any

import msgpack

from ..errors import FrameError
from ..settings import MAX_FRAME

__all__ = ["Channel", "MAX_FRAME", "RETAIN", "SHM_THRESHOLD"]

_HEADER = struct.Struct("!I")
#: Byte strings at least this long travel through shared memory (where the platform has memfd).
SHM_THRESHOLD = 64 * 1024
_SHM_EXT = 1  # msgpack ext code of a shared-memory reference to bytes: (offset, length) as two uint64
_SHM_STR_EXT = 2  # the same for a str, stored as UTF-8 (e.g. a task body kombu decoded to text)
_REF = struct.Struct("!QQ")
_MIN_SEGMENT = 1 << 20
#: Bytes of its segment (and of its landing buffer) a channel keeps resident after use. A frame that needed more
#: gives the rest back once the other side has read it (:meth:`Channel.trim`, :meth:`Channel.trim_landing`): one
#: huge body must not keep that much memory in either process for good, while steady traffic up to this size
#: keeps reusing the same pages (no page faults).
RETAIN = 16 << 20
_FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)  # room for a few descriptors per read
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)  # received descriptors are not inherited by subprocesses

Blob = bytes | bytearray | memoryview
_CONTAINERS = (dict, list, tuple)
_STRINGS = (str, bytes, bytearray, memoryview)


def _fallback(obj: Any) -> Any:
    # Message headers are JSON-like already; a broker may add datetimes or other odd scalars.
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, memoryview):
        return obj.tobytes()
    return repr(obj)


class _Segment:
    """A memfd mapped into this process."""

    def __init__(self, fd: int, size: int, writable: bool) -> None:
        self.fd = fd
        self.size = size
        self.used = 0  # the most bytes written into it since its pages were last given back
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)

    @classmethod
    def create(cls, size: int) -> _Segment:
        fd = os.memfd_create("celery-gpu-frames", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, writable=True)
        except BaseException:
            os.close(fd)
            raise

    def give_back(self, keep: int) -> None:
        """Free the pages beyond the first ``keep`` bytes, in every process that maps the segment (a hole
        punched in the memfd: reading there gives zeros, a later write faults fresh pages in)."""
        if self.used > keep:
            self.map.madvise(mmap.MADV_REMOVE, keep, self.size - keep)
            self.used = keep

    def release(self) -> None:
        try:
            self.map.close()
        finally:
            os.close(self.fd)


class Channel:
    """One end of a stream socket carrying frames."""

    def __init__(self, sock: socket.socket, max_frame: int = MAX_FRAME, shm_threshold: int | None = None,
                 landing: bool = False) -> None:
        self.sock = sock
        self.max_frame = max_frame
        #: Resolve long byte strings into views of a private buffer reused from frame to frame (no fresh
        #: allocation, so no page faults: the device process's side), instead of new ``bytes``.
        self.landing = landing
        self._landing: bytearray | None = None
        self._landed = 0  # bytes of the landing buffer used by the frame being read
        usable = hasattr(os, "memfd_create") and sock.family == getattr(socket, "AF_UNIX", None)
        threshold = SHM_THRESHOLD if shm_threshold is None else shm_threshold
        #: Byte strings this long or longer go through shared memory; None: never (no memfd, not AF_UNIX).
        self.shm_threshold: int | None = threshold if usable else None
        self._out: _Segment | None = None  # ours: long strings are written into it
        self._in: _Segment | None = None  # the other side's, received with SCM_RIGHTS
        self.shm_bytes = 0  # bytes written through shared memory (stats and tests)

    def fileno(self) -> int:
        """The socket's fd, for selectors and the event loop."""
        return self.sock.fileno()

    # -- writing ---------------------------------------------------------------------------------------------

    def write(self, obj: Any) -> None:
        """Encode ``obj`` and write it as one frame (blocking until written)."""
        big: list[Blob] = []
        if self.shm_threshold is not None:
            obj = self._externalize(obj, big, [0], self.shm_threshold)
        body = msgpack.packb(obj, use_bin_type=True, default=_fallback)
        total = len(body) + sum(len(b) for b in big)
        if total > self.max_frame:
            raise FrameError(f"frame of {total} bytes exceeds the maximum of {self.max_frame}")
        data = _HEADER.pack(len(body)) + body
        fds = self._place(big) if big else []
        if fds:
            sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def _externalize(self, obj: Any, big: list[Blob], end: list[int], threshold: int) -> Any:
        """``obj`` with each long byte string replaced by a reference to where :meth:`_place` will put it
        (``end[0]``: the bytes placed so far). Containers without one are returned as they are (not copied), and
        only containers and long strings are visited: a batch frame's many small request dicts cost little."""
        code = _SHM_EXT
        if isinstance(obj, str) and len(obj) >= threshold:
            obj, code = obj.encode("utf-8", "surrogatepass"), _SHM_STR_EXT
        if isinstance(obj, (bytes, bytearray, memoryview)) and len(obj) >= threshold:
            big.append(obj)
            ref = msgpack.ExtType(code, _REF.pack(end[0], len(obj)))
            end[0] += len(obj)
            return ref
        if isinstance(obj, dict):
            out: dict[Any, Any] | None = None
            for k, v in obj.items():
                if isinstance(v, _CONTAINERS) or (isinstance(v, _STRINGS) and len(v) >= threshold):
                    new = self._externalize(v, big, end, threshold)
                    if new is not v:
                        if out is None:
                            out = dict(obj)
                        out[k] = new
            return obj if out is None else out
        if isinstance(obj, (list, tuple)):
            items: list[Any] | None = None
            for i, v in enumerate(obj):
                if isinstance(v, _CONTAINERS) or (isinstance(v, _STRINGS) and len(v) >= threshold):
                    new = self._externalize(v, big, end, threshold)
                    if new is not v:
                        if items is None:
                            items = list(obj)
                        items[i] = new
            return obj if items is None else items
        return obj

    def _place(self, big: list[Blob]) -> list[int]:
        """Copy the long strings into our segment (a new, larger one when needed); the fds to send along."""
        need = sum(len(b) for b in big)
        fds: list[int] = []
        if self._out is None or self._out.size < need:
            fresh = _Segment.create(max(_MIN_SEGMENT, 1 << (need - 1).bit_length()))
            if self._out is not None:
                self._out.release()
            self._out = fresh
            fds = [fresh.fd]
        offset = 0
        for b in big:
            self._out.map[offset:offset + len(b)] = b
            offset += len(b)
        self._out.used = max(self._out.used, need)
        self.shm_bytes += need
        return fds

    def trim(self) -> None:
        """The other side has read every frame we wrote: give back our segment's pages beyond :data:`RETAIN`.

        Only the caller knows when that is (the protocol's replies: the pool after a ``done``, a device process on
        its next ``run``); before it, the other side may still be copying out of those pages.
        """
        if self._out is not None and hasattr(mmap, "MADV_REMOVE"):
            self._out.give_back(RETAIN)

    def trim_landing(self) -> None:
        """Nothing needs the landing buffer's bytes any more: drop it when it is larger than :data:`RETAIN` (it is
        freed unless a task still holds a view of it), so one huge frame does not keep that much for good."""
        if self._landing is not None and len(self._landing) > RETAIN:
            self._landing = None

    # -- reading ---------------------------------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether a frame (or the end of the stream) is waiting to be read, without blocking."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def read(self) -> Any:
        """Read one frame.

        Raises:
            EOFError: the other end closed (or died) at a frame boundary or inside a frame.
            FrameError: the frame is larger than allowed, not valid msgpack, or refers outside the segment.
        """
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        self._landed = 0
        if size > self.max_frame:
            raise FrameError(f"frame header announces {size} bytes, more than the maximum of {self.max_frame}")
        body = self._read(size)
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=self._resolve)
        except FrameError:
            raise
        except Exception as exc:
            raise FrameError(f"malformed frame: {exc}") from None
        finally:
            if self._in is not None and self._in.used > RETAIN:
                # Copied out: this process's share of a huge frame's pages goes (the writer frees them: trim).
                self._in.map.madvise(mmap.MADV_DONTNEED, RETAIN, self._in.size - RETAIN)
                self._in.used = 0

    def _resolve(self, code: int, data: bytes) -> Any:
        """A shared-memory reference → a copy of the bytes it names, checked against the segment first."""
        if code not in (_SHM_EXT, _SHM_STR_EXT):
            return msgpack.ExtType(code, data)
        if self._in is None or len(data) != _REF.size:
            raise FrameError("a shared-memory reference without a segment, or a malformed one")
        offset, length = _REF.unpack(data)
        if length > self.max_frame or offset + length > self._in.size:
            raise FrameError(f"a shared-memory reference ({offset}+{length}) outside the segment of {self._in.size}")
        self._in.used = max(self._in.used, offset + length)
        if code == _SHM_STR_EXT:
            return self._in.map[offset:offset + length].decode("utf-8", "surrogatepass")
        if not self.landing:
            return self._in.map[offset:offset + length]
        target = self._land(length)
        with memoryview(self._in.map) as source:
            target[:] = source[offset:offset + length]
        return target

    def _land(self, length: int) -> memoryview:
        """``length`` bytes of the landing buffer for the frame being read. The buffer is reused while nothing
        still views it (a task that keeps an array of its input keeps that buffer: a new one is made)."""
        buf = self._landing
        if buf is not None and self._landed == 0:
            try:
                buf.append(0)  # a bytearray with live views cannot change size: BufferError
                buf.pop()
            except BufferError:
                buf = self._landing = None
        if buf is None or self._landed + length > len(buf):
            if self._landed == 0:
                buf = self._landing = bytearray(max(length, _MIN_SEGMENT))
            else:  # earlier strings of this frame live in the old buffer; the rest go to a new one
                buf = self._landing = bytearray(max(length, _MIN_SEGMENT, len(buf or b"") * 2))
                self._landed = 0
        start = self._landed
        self._landed += length
        return memoryview(buf)[start:start + length]

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            r, ancillary, _, _ = self.sock.recvmsg_into([view[got:]], _FD_SPACE, _RECV_FLAGS)
            if ancillary:
                self._adopt(ancillary)
            if r == 0:
                raise EOFError("device process pipe closed")
            got += r
        return buf

    def _adopt(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        """Take the other side's (new) segment from ``SCM_RIGHTS`` data; close anything unexpected."""
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not fds:
            return
        for extra in fds[1:]:
            os.close(extra)
        fd = fds[0]
        try:
            segment = _Segment(fd, os.fstat(fd).st_size, writable=False)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise FrameError(f"unusable shared-memory segment: {exc}") from None
        if self._in is not None:
            self._in.release()
        self._in = segment

    def close(self) -> None:
        """Close the socket and unmap both segments; safe to call twice."""
        for segment in (self._out, self._in):
            if segment is not None:
                try:
                    segment.release()
                except (OSError, ValueError):  # pragma: no cover
                    pass
        self._out = self._in = None
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
