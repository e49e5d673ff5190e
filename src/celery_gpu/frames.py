"""Frames on the pipe between the worker and its device processes: a 4-byte length, then msgpack.

No pickle: a frame decodes to plain data (dicts, lists, str, bytes, numbers) or raises :class:`FrameError`.
The length is checked against a maximum before anything is allocated for the body.
"""

from __future__ import annotations

import socket
import struct
from datetime import datetime
from typing import Any

import msgpack

from .errors import FrameError

__all__ = ["Channel", "MAX_FRAME"]

_HEADER = struct.Struct("!I")
#: Largest frame accepted by default; a whole Celery message body travels in one frame.
MAX_FRAME = 1 << 30


def _fallback(obj: Any) -> Any:
    # Message headers are JSON-like already; a broker may add datetimes or other odd scalars.
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, memoryview):
        return obj.tobytes()
    return repr(obj)


class Channel:
    """One end of a stream socket carrying frames."""

    def __init__(self, sock: socket.socket, max_frame: int = MAX_FRAME) -> None:
        self.sock = sock
        self.max_frame = max_frame

    def fileno(self) -> int:
        """The socket's fd, for selectors and the event loop."""
        return self.sock.fileno()

    def write(self, obj: Any) -> None:
        """Encode ``obj`` and write it as one frame (blocking until written)."""
        body = msgpack.packb(obj, use_bin_type=True, default=_fallback)
        if len(body) > self.max_frame:
            raise FrameError(f"frame of {len(body)} bytes exceeds the maximum of {self.max_frame}")
        self.sock.sendall(_HEADER.pack(len(body)) + body)

    def pending(self) -> bool:
        """Whether a frame (or the end of the stream) is waiting to be read, without blocking."""
        import select

        return bool(select.select([self.sock], [], [], 0)[0])

    def read(self) -> Any:
        """Read one frame.

        Raises:
            EOFError: the other end closed (or died) at a frame boundary or inside a frame.
            FrameError: the frame is larger than allowed or not valid msgpack.
        """
        (size,) = _HEADER.unpack(self._read(_HEADER.size))
        if size > self.max_frame:
            raise FrameError(f"frame header announces {size} bytes, more than the maximum of {self.max_frame}")
        body = self._read(size)
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:
            raise FrameError(f"malformed frame: {exc}") from None

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            r = self.sock.recv_into(view[got:], n - got)
            if r == 0:
                raise EOFError("device process pipe closed")
            got += r
        return buf

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass
