"""Kept for users: ``from celery_gpu import arrays`` (``arrays.dumps``, ``arrays.loads``, ``arrays.NAME``). The
serializer lives in :mod:`celery_gpu.payload.arrays`."""

from .payload.arrays import (
    CONTENT_TYPE,
    DTYPES,
    NAME,
    dumps,
    get_max_payload,
    loads,
    register,
    set_max_payload,
)

__all__ = ["NAME", "CONTENT_TYPE", "DTYPES", "dumps", "loads", "register", "set_max_payload", "get_max_payload"]
