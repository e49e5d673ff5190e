"""A safe serializer for arrays inside JSON-like values; registered with kombu, no pickle anywhere.

Sends numpy arrays of the allowed dtypes (:data:`DTYPES`), numpy scalars, torch tensors and CuPy arrays (both
sent as host arrays), nested in lists, tuples and ``str``-keyed dicts with ``None``, bool, int (64-bit), float,
str and bytes. The receiving side gets numpy arrays, or torch tensors with ``loads(data, tensors="torch")``.

Wire format (version 1), integers little-endian::

    prelude   16 bytes  b"CGPA", version (u8, 1), 3 zero bytes, header length H (u64)
    header    H bytes   msgpack of the value; an array is ExtType(1, meta), a numpy scalar ExtType(2, meta),
                        meta = msgpack [dtype, shape, order, offset, nbytes]
    buffers             from D = 16 + H rounded up to 64: each array's raw bytes at D + offset

``dtype`` is numpy's ``dtype.str`` (``'<f4'``, ``'>i8'``, ``'|b1'``) and must be in :data:`DTYPES`; ``shape`` a
list of at most :data:`MAX_NDIM` non-negative ints; ``order`` ``'C'`` or ``'F'``; ``offset`` a multiple of 64;
``nbytes`` must equal product(shape) x itemsize. A payload without arrays ends after the header.

Decoding rules:

* Arrays are views on the input, never copies: read-only when the input is ``bytes``, writable when it is a
  ``bytearray`` (or writable memoryview). Buffers are 64-byte aligned relative to the payload's start, so the
  views are aligned whenever the input is (``bytes`` always is, for every allowed dtype).
* Tuples come back as lists (as with JSON and msgpack); dict keys must be ``str``.
* Every header is checked (dtype allowlist, shape, nbytes, bounds) before an array is made from it, and the
  msgpack limits are set from the header's length, so a lying payload never allocates; any bad payload raises
  :class:`ArrayDecodeError` (kombu wraps it in ``kombu.exceptions.DecodeError``). Nesting is bounded by
  msgpack's own stack (1024 levels); :func:`dumps` refuses more than :data:`MAX_DEPTH`.

torch ``bfloat16`` (and the other dtypes numpy lacks) is refused with :class:`ArraySerializationError`: send
``t.float()``, or ``t.view(torch.int16)`` to keep the bits.
"""

from __future__ import annotations

import datetime
import decimal
import importlib
import json
import math
import os
import struct
import uuid
from typing import Any, Literal

import msgpack
import numpy as np

from ..errors import ArrayDecodeError, ArraySerializationError, PayloadTooLarge
from ..units import parse_memory
from . import claims

__all__ = [
    "NAME",
    "CONTENT_TYPE",
    "DTYPES",
    "dumps",
    "loads",
    "register",
    "set_max_payload",
    "get_max_payload",
]

#: Name of the serializer in kombu / Celery (``task_serializer``, ``accept_content``).
NAME = "celery-gpu-arrays"
#: Content type of its messages.
CONTENT_TYPE = "application/x-celery-gpu-arrays"
#: Default largest payload :func:`dumps` produces (overridden by ``CELERY_GPU_MAX_PAYLOAD`` or :func:`set_max_payload`).
DEFAULT_MAX_PAYLOAD = 1 << 30
#: Deepest nesting of lists and dicts :func:`dumps` accepts.
MAX_DEPTH = 64
#: Most dimensions an array may have.
MAX_NDIM = 32
#: Alignment of every array's buffer, relative to the payload's start.
ALIGN = 64

_NUMERIC = ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")
#: Allowed dtypes in ``dtype.str`` form, both byte orders.
DTYPES = frozenset(np.dtype(t).newbyteorder(e).str for t in _NUMERIC for e in ("<", ">"))

_PRELUDE = struct.Struct("<4sB3xQ")
_MAGIC = b"CGPA"
_VERSION = 1
_ARRAY, _SCALAR = 1, 2
# Values kombu's JSON also carries, as text (datetime/date/time: ISO 8601; UUID: its 16 bytes; Decimal: str).
_DATETIME, _DATE, _TIME, _UUID, _DECIMAL = 3, 4, 5, 6, 7
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_TASK_BODY_PARTS = ("args", "kwargs", "embed")

_max_payload: int | None = None


def set_max_payload(nbytes: int | str | None) -> None:
    """Set the largest payload :func:`dumps` produces (``2GiB``, a byte count); ``None`` restores the default."""
    global _max_payload
    _max_payload = None if nbytes is None else parse_memory(nbytes)


def get_max_payload() -> int:
    """The largest payload :func:`dumps` produces: :func:`set_max_payload`, ``CELERY_GPU_MAX_PAYLOAD``, or 1 GiB."""
    if _max_payload is not None:
        return _max_payload
    env = os.environ.get("CELERY_GPU_MAX_PAYLOAD")
    return parse_memory(env) if env else DEFAULT_MAX_PAYLOAD


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _limits(n: int) -> dict[str, int]:
    # No msgpack object in n bytes can be longer than n: a lying length fails before anything is allocated.
    return {"max_str_len": n, "max_bin_len": n, "max_array_len": n, "max_map_len": n // 2, "max_ext_len": n}


class _Unsendable(Exception):
    """Raised while walking a value; ``path`` collects the location, innermost first."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.path: list[str] = []


def _torch_host(obj: Any) -> np.ndarray[Any, Any]:
    if str(obj.dtype) == "torch.bfloat16":
        raise _Unsendable("torch.bfloat16 has no numpy dtype; send t.float(), or t.view(torch.int16) to keep the bits")
    try:
        return np.asarray(obj.numpy(force=True))  # detached, on the host, conjugation/negation resolved
    except (TypeError, RuntimeError) as exc:
        raise _Unsendable(f"cannot send a {obj.dtype} tensor: {exc}") from None


def _as_array(obj: Any) -> tuple[np.ndarray[Any, Any], int] | None:
    """The host array and extension code for an array-like value, or ``None`` when it is not one."""
    if isinstance(obj, np.ndarray):
        if isinstance(obj, np.ma.MaskedArray):
            raise _Unsendable("masked arrays are not supported (the mask would be lost); send .data and .mask")
        return np.asarray(obj), _ARRAY  # subclasses (memmap, matrix) go as plain arrays
    if isinstance(obj, np.generic) and not isinstance(obj, (str, bytes)):
        return np.asarray(obj), _SCALAR
    module = type(obj).__module__
    if module.startswith("torch") and hasattr(obj, "detach"):
        return _torch_host(obj), _ARRAY
    if module.startswith("cupy") and hasattr(obj, "get"):
        return np.asarray(obj.get()), _ARRAY
    return None


class _Encoder:
    """Walks a value into a msgpack-ready tree, laying out the arrays' buffers as it goes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.arrays: list[tuple[int, np.ndarray[Any, Any]]] = []  # (offset, array)
        self.end = 0  # bytes of the buffer region so far

    def walk(self, obj: Any, depth: int) -> Any:
        t = type(obj)
        if obj is None or t is str or t is float or t is bool or t is bytes:
            return obj
        if t is int:
            if not _INT_MIN <= obj <= _INT_MAX:
                raise _Unsendable(f"int {obj} does not fit in 64 bits")
            return obj
        if depth >= MAX_DEPTH and isinstance(obj, (list, tuple, dict)):
            raise _Unsendable(f"nested deeper than {MAX_DEPTH} levels")
        if t is list or t is tuple:
            return self._sequence(obj, depth)
        if t is dict:
            return self._mapping(obj, depth)
        found = _as_array(obj)
        if found is not None:
            return self._array(*found)
        if isinstance(obj, (str, float, bytes)):  # subclasses (str enums, np.str_): msgpack packs the base type
            return obj
        plain = _plain_ext(obj)
        if plain is not None:
            return plain
        if isinstance(obj, int):  # int enums
            return self.walk(int(obj), depth)
        if isinstance(obj, bytearray):
            return bytes(obj)
        if isinstance(obj, (list, tuple)):
            return self._sequence(obj, depth)
        if isinstance(obj, dict):  # Celery's signatures are dicts
            return self._mapping(obj, depth)
        raise _Unsendable(f"cannot serialize {t}")

    def _sequence(self, obj: list[Any] | tuple[Any, ...], depth: int) -> list[Any]:
        out = []
        for i, value in enumerate(obj):
            try:
                out.append(self.walk(value, depth + 1))
            except _Unsendable as exc:
                exc.path.append(f"[{i}]")
                raise
        return out

    def _mapping(self, obj: dict[Any, Any], depth: int) -> dict[str, Any]:
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                if key is None or isinstance(key, (bool, int, float)):  # as JSON does: 1 -> "1", None -> "null"
                    key = json.dumps(key)
                else:
                    raise _Unsendable(f"dict key {key!r} is not a str")
            try:
                out[key] = self.walk(value, depth + 1)
            except _Unsendable as exc:
                exc.path.append(f"[{key!r}]")
                raise
        return out

    def _array(self, arr: np.ndarray[Any, Any], code: int) -> msgpack.ExtType:
        if arr.dtype.str not in DTYPES:
            raise _Unsendable(f"dtype {arr.dtype} is not supported (bool, (u)int8-64, float16-64, complex64/128)")
        if arr.ndim > MAX_NDIM:
            raise _Unsendable(f"{arr.ndim} dimensions, more than {MAX_NDIM}")
        offset = _align(self.end)
        self.end = offset + arr.nbytes
        if self.end > self.limit:
            raise PayloadTooLarge(f"payload of more than {self.end} bytes exceeds the maximum of {self.limit} "
                                  "(set_max_payload() or CELERY_GPU_MAX_PAYLOAD)")
        order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
        self.arrays.append((offset, arr))
        return msgpack.ExtType(code, msgpack.packb([arr.dtype.str, list(arr.shape), order, offset, arr.nbytes]))


def _plain_ext(obj: Any) -> msgpack.ExtType | None:
    """datetime, date, time, UUID and Decimal, which kombu's JSON serializer also carries; else None."""
    if isinstance(obj, datetime.datetime):
        return msgpack.ExtType(_DATETIME, obj.isoformat().encode())
    if isinstance(obj, datetime.date):
        return msgpack.ExtType(_DATE, obj.isoformat().encode())
    if isinstance(obj, datetime.time):
        return msgpack.ExtType(_TIME, obj.isoformat().encode())
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_UUID, obj.bytes)
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(_DECIMAL, str(obj).encode())
    return None


def _plain_value(code: int, payload: bytes) -> Any:
    try:
        if code == _UUID:
            return uuid.UUID(bytes=payload)
        text = payload.decode("ascii")
        if code == _DATETIME:
            return datetime.datetime.fromisoformat(text)
        if code == _DATE:
            return datetime.date.fromisoformat(text)
        if code == _TIME:
            return datetime.time.fromisoformat(text)
        return decimal.Decimal(text)
    except (ValueError, ArithmeticError) as exc:
        raise ArrayDecodeError(f"malformed value of extension type {code}: {exc}") from None


def _raw(arr: np.ndarray[Any, Any]) -> memoryview:
    """The array's bytes in its memory order (a copy only when it is not contiguous)."""
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        arr = np.ascontiguousarray(arr)
    return arr.ravel(order="K").view(np.uint8).data


def _where(path: list[str], obj: Any) -> str:
    parts = path[::-1]
    is_task_body = (isinstance(obj, (list, tuple)) and len(obj) == 3 and isinstance(obj[1], dict)
                    and isinstance(obj[2], dict) and "callbacks" in obj[2])
    if parts and is_task_body:  # Celery's message body: (args, kwargs, embed)
        parts[0] = _TASK_BODY_PARTS[int(parts[0][1])]
    return "".join(parts) or "value"


def dumps(obj: Any, *, max_payload: int | None = None) -> bytes:
    """Encode ``obj`` (see the module's docstring for what it may hold).

    Raises:
        ArraySerializationError: a value cannot be sent; the message says where (``args[0]['image']: ...``).
        PayloadTooLarge: the payload would exceed ``max_payload`` (default :func:`get_max_payload`); raised
            before the payload is built.
    """
    limit = get_max_payload() if max_payload is None else max_payload
    encoder = _Encoder(limit)
    try:
        tree = encoder.walk(obj, 0)
    except _Unsendable as exc:
        raise ArraySerializationError(f"{_where(exc.path, obj)}: {exc}") from None
    header = msgpack.packb(tree, use_bin_type=True)
    pos = _PRELUDE.size + len(header)
    start = _align(pos)
    total = start + encoder.end if encoder.arrays else pos
    if total > limit:
        raise PayloadTooLarge(f"payload of {total} bytes exceeds the maximum of {limit} "
                              "(set_max_payload() or CELERY_GPU_MAX_PAYLOAD)")
    parts: list[bytes | memoryview] = [_PRELUDE.pack(_MAGIC, _VERSION, len(header)), header]
    for offset, arr in encoder.arrays:
        parts.append(bytes(start + offset - pos))  # zero padding up to the aligned offset
        parts.append(_raw(arr))
        pos = start + offset + arr.nbytes
    payload = b"".join(parts)
    cut = claims.threshold()
    if cut is not None and len(payload) >= cut:  # out of band: the message carries a reference
        return claims.wrap(payload, claims.store(), cut, claims.ttl(), skeleton=_skeleton(obj))
    return payload


def _skeleton(obj: Any) -> bytes | None:
    """For a Celery task body ``(args, kwargs, embed)``: the same body without its arguments (callbacks,
    chord and the like kept), for the worker's main process, which decodes bodies but never runs them."""
    if isinstance(obj, (tuple, list)) and len(obj) == 3 and isinstance(obj[1], dict) \
            and (obj[2] is None or isinstance(obj[2], dict)):
        try:
            return dumps([[], {}, obj[2]])
        except ArraySerializationError:
            return None
    return None


def _to_torch(arr: np.ndarray[Any, Any]) -> Any:
    import torch

    if not arr.dtype.isnative:  # torch has no byte order: a native copy
        arr = arr.astype(arr.dtype.newbyteorder("="))
    elif not arr.flags.writeable:  # torch assumes writable memory: a copy of read-only views
        arr = arr.copy(order="K")
    return torch.from_numpy(arr)


class _Decoder:
    """The ext hook of one payload: checks each array's header, then makes a view on the buffer region."""

    def __init__(self, view: memoryview, start: int, tensors: str) -> None:
        self.view = view
        self.start = start
        self.tensors = tensors

    def ext(self, code: int, payload: bytes) -> Any:
        if code in (_DATETIME, _DATE, _TIME, _UUID, _DECIMAL):
            return _plain_value(code, payload)
        if code not in (_ARRAY, _SCALAR):
            raise ArrayDecodeError(f"unknown extension type {code}")
        try:
            meta = msgpack.unpackb(payload, raw=False, **_limits(len(payload)))
        except Exception as exc:
            raise ArrayDecodeError(f"malformed array header: {exc!r}") from None
        arr = self._array(meta)
        if code == _SCALAR:
            if arr.ndim:
                raise ArrayDecodeError(f"a scalar with shape {arr.shape}")
            return arr[()]
        return _to_torch(arr) if self.tensors == "torch" else arr

    def _array(self, meta: Any) -> np.ndarray[Any, Any]:
        if type(meta) is not list or len(meta) != 5:
            raise ArrayDecodeError(f"array header is not [dtype, shape, order, offset, nbytes]: {meta!r:.200}")
        dtype, shape, order, offset, nbytes = meta
        if type(dtype) is not str or dtype not in DTYPES:
            raise ArrayDecodeError(f"dtype {dtype!r:.50} is not allowed")
        if (type(shape) is not list or len(shape) > MAX_NDIM
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise ArrayDecodeError(f"bad shape {shape!r:.200}")
        if type(order) is not str or order not in ("C", "F"):
            raise ArrayDecodeError(f"bad order {order!r:.50}")
        if type(offset) is not int or offset < 0 or offset % ALIGN:
            raise ArrayDecodeError(f"bad offset {offset!r:.50}")
        dt = np.dtype(str(dtype))
        itemsize = dt.itemsize
        if math.prod(max(d, 1) for d in shape) * itemsize >= 1 << 63:
            raise ArrayDecodeError(f"shape {shape} is too large")
        if type(nbytes) is not int or nbytes != math.prod(shape) * itemsize:
            raise ArrayDecodeError(f"nbytes {nbytes!r:.50} does not match shape {shape} of {dtype}")
        if self.start + offset + nbytes > len(self.view):
            raise ArrayDecodeError(f"array of {nbytes} bytes at offset {offset} runs past the end of the payload")
        layout: Literal["C", "F"] = "F" if order == "F" else "C"
        arr: np.ndarray[Any, Any] = np.ndarray(tuple(shape), dt, buffer=self.view, offset=self.start + offset,
                                               order=layout)
        return arr


def loads(data: bytes | bytearray | memoryview, *, tensors: Literal["numpy", "torch"] = "numpy") -> Any:
    """Decode a payload of :func:`dumps`; arrays are views on ``data`` (see the module's docstring).

    With ``tensors="torch"`` every array comes back as a CPU torch tensor: sharing ``data``'s memory when it is
    writable and native-endian, else a copy (torch tensors are writable). Numpy scalars stay numpy scalars.

    Raises:
        ArrayDecodeError: the payload is not one of :func:`dumps`, is malformed, or its headers lie.
    """
    if tensors not in ("numpy", "torch"):
        raise ValueError(f"tensors must be 'numpy' or 'torch', got {tensors!r}")
    if tensors == "torch":
        importlib.import_module("torch")  # a missing torch is an ImportError here, not a decode error later
    if isinstance(data, (bytes, bytearray, memoryview)) and claims.is_reference(data):
        data = claims.skeleton_or_refuse(data) if claims.fetch_deferred() else claims.unwrap(data, claims.store())
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise ArrayDecodeError(f"expected a bytes-like payload, got {type(data)}") from None
    if len(view) < _PRELUDE.size:
        raise ArrayDecodeError(f"payload of {len(view)} bytes is shorter than the {_PRELUDE.size}-byte prelude")
    magic, version, size = _PRELUDE.unpack_from(view)
    if magic != _MAGIC:
        raise ArrayDecodeError(f"not a {NAME} payload (starts with {bytes(view[:4])!r})")
    if version != _VERSION:
        raise ArrayDecodeError(f"unsupported {NAME} format version {version}")
    if size > len(view) - _PRELUDE.size:
        raise ArrayDecodeError(f"header of {size} bytes runs past the end of the {len(view)}-byte payload")
    decoder = _Decoder(view, _align(_PRELUDE.size + size), tensors)
    header = view[_PRELUDE.size:_PRELUDE.size + size]
    try:
        return msgpack.unpackb(header, ext_hook=decoder.ext, raw=False, **_limits(size))
    except ArrayDecodeError:
        raise
    except Exception as exc:  # msgpack's errors, bad UTF-8, unhashable keys, stack overflow: all the payload's fault
        raise ArrayDecodeError(f"malformed payload: {exc!r:.300}") from None


def register(name: str = NAME) -> None:
    """Register the serializer with kombu under ``name`` (idempotent); Celery can then use it by name."""
    from kombu.serialization import register as kombu_register

    kombu_register(name, dumps, loads, content_type=CONTENT_TYPE, content_encoding="binary")  # type: ignore[no-untyped-call]
