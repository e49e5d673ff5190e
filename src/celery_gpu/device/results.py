"""Result writes of a batch in one round trip: the Redis result backend's per-task writes, buffered.

Celery's Redis backend stores a result with a ``GET`` (a stored success is never overwritten) and then a
``SET`` + ``PUBLISH`` pipeline: two round trips per task. Inside :class:`BatchResults` the backend's
``_store_result`` records instead, and :meth:`BatchResults.flush` does one ``MGET`` and one pipeline for the
whole batch, with the same rules (success never overwritten, ``result_expires`` / failure expiry, publish
for waiting clients). Other backends store per task, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

__all__ = ["BatchResults"]


def _is_redis(backend: Any) -> bool:
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # pragma: no cover - redis is a core dependency
        return False
    return isinstance(backend, RedisBackend)


class BatchResults:
    """Context manager buffering a Redis result backend's writes; :meth:`flush` writes them all at once."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.enabled = _is_redis(backend)
        self.pending: list[tuple[str, str | bytes, str]] = []
        self.writes = 0  # round trips used by flush (for stats and tests)

    def __enter__(self) -> BatchResults:
        if self.enabled:
            self.backend._store_result = self._record
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.enabled:
            del self.backend._store_result  # back to the class's method
        self.flush()

    @contextmanager
    def direct(self) -> Iterator[None]:
        """Inside, writes go straight to the backend (what was buffered is written first, keeping order)."""
        self.flush()
        if not self.enabled:
            yield
            return
        del self.backend._store_result
        try:
            yield
        finally:
            self.backend._store_result = self._record

    def _record(self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None,
                **kwargs: Any) -> Any:
        from kombu.utils.encoding import bytes_to_str

        backend = self.backend
        meta = backend._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)  # type: ignore[no-untyped-call]
        value = backend.encode(meta)
        if isinstance(value, str) and len(value) > backend._MAX_STR_VALUE_SIZE:
            # Too big for Redis: let the backend's own path raise its BackendStoreError for this task.
            return type(backend)._store_result(backend, task_id, result, state, traceback, request, **kwargs)
        self.pending.append((backend.get_key_for_task(task_id), value, state))
        return result

    def flush(self) -> None:
        """Write every recorded result: one ``MGET``, then one pipeline of ``SET``/``SETEX`` + ``PUBLISH``."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        self.backend.ensure(self._write, (pending,))

    def _write(self, pending: list[tuple[str, str | bytes, str]]) -> None:
        from celery import states

        backend = self.backend
        client = backend.client
        current = client.mget([key for key, _, _ in pending])
        with client.pipeline() as pipe:
            for (key, value, state), old in zip(pending, current, strict=True):
                if old is not None and backend.decode_result(old).get("status") == states.SUCCESS:
                    continue  # as Celery: a stored success is final (a redelivered duplicate must not undo it)
                expires = backend.failure_expires if state == states.FAILURE else backend.expires
                pipe.set(key, value, ex=expires or None)
                pipe.publish(key, value)
            pipe.execute()
        self.writes += 2
