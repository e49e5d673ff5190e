"""Malformed task messages (issue 17, item 4): whatever a body holds, a client that can be told is told.

Every message below carries readable headers (a task id and a known task name) and a body that cannot run:
the wrong shape for ``[args, kwargs, embed]``, a content type the worker refuses, bytes that do not decode,
forged arrays or claim-check references. Each must end with a stored :class:`MalformedTaskMessage` that says
what was wrong, on Redis and on RabbitMQ, for plain and batched GPU tasks and for a plain Celery task of the
app; no device process may die of it, and the worker keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest

from celery_gpu.payload import arrays, claims
from tests.brokers import Broker
from tests.chaos.conftest import APP, ledger, start, task
from tests.worker import wait_until

pytestmark = pytest.mark.broker

JSON = "application/json"

#: Bodies that decode but are not ``[args, kwargs, embed]``, and what the stored failure must mention.
SHAPES: list[tuple[str, Any, str]] = [
    ("embed-not-a-dict", [["x"], {}, "notadict"], "embed"),
    ("kwargs-not-a-dict", [[1], "notadict", {}], "kwargs"),
    ("all-null", [None, None, None], "args"),
    ("two-items", [[1], {}], "[args, kwargs, embed]"),
    ("not-a-list", {"x": 1}, "[args, kwargs, embed]"),
    ("embed-bad-key", [[1], {}, {"callbacks": 5}], "callbacks"),
]


def _claim_reference(skeleton: bytes | None) -> bytes:
    """A claim-check reference to a payload that was never stored, with or without a skeleton."""
    doc: dict[str, Any] = {"key": "celery-gpu-claim:" + "0" * 32, "size": 10, "sha256": hashlib.sha256(b"").hexdigest()}
    if skeleton is not None:
        doc["skeleton"] = skeleton
    return claims.MAGIC + msgpack.packb(doc, use_bin_type=True)


#: Raw bodies (bytes, content type, encoding) that the worker's main process refuses, and a word the stored
#: failure must carry.
REFUSED: list[tuple[str, bytes, str, str, str]] = [
    ("pickle", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94.", "application/x-python-serialize", "binary",
     "pickle"),
    ("bad-utf8", b'[["\xff\xfe"], {}, {}]', JSON, "utf-8", "decode"),
    ("not-json", b"[[1], {}, {", JSON, "utf-8", "decode"),
    ("unknown-type", b"whatever", "application/x-unknown", "binary", "x-unknown"),
    ("forged-arrays", b"CGPA" + os.urandom(40), arrays.CONTENT_TYPE, "binary", "ArrayDecodeError"),
    ("forged-claim", claims.MAGIC + b"\xc1\xc1", arrays.CONTENT_TYPE, "binary", "claim"),
    ("claim-forged-key", claims.MAGIC + msgpack.packb({"key": "../../etc/passwd", "size": 1, "sha256": "00"}),
     arrays.CONTENT_TYPE, "binary", "claim"),
    ("claim-no-skeleton", _claim_reference(None), arrays.CONTENT_TYPE, "binary", "skeleton"),
]


def publish(w: Any, name: str | None, body: bytes, content_type: str, encoding: str, **extra: Any) -> str:
    """Put one raw message on the worker's queue, as a Celery client would, but with this body (no task name in
    its headers when ``name`` is None; ``extra`` headers added); its id."""
    task_id = f"malformed-{uuid.uuid4().hex[:12]}"
    headers = {"lang": "py", "task": name, "id": task_id, "root_id": task_id, "retries": 0, "argsrepr": "()",
               "kwargsrepr": "{}", "origin": "test", "ignore_result": False, **extra}
    if name is None:
        del headers["task"]
    with w.app.producer_or_acquire() as producer:
        producer.publish(body, routing_key=w.queue, exchange="", content_type=content_type, content_encoding=encoding,
                         serializer=None, retry=True, headers=headers)
    return task_id


def failures(w: Any, ids: list[str], timeout: float = 60) -> dict[str, Any]:
    """Task id -> the exception each task failed with (a value when it succeeded, None when nothing was stored
    within ``timeout`` seconds, all tasks together)."""
    results = {i: w.app.AsyncResult(i) for i in ids}
    wait_until(lambda: all(r.ready() for r in results.values()), timeout, interval=0.2)
    out: dict[str, Any] = {}
    for task_id, result in results.items():
        if not result.ready():
            out[task_id] = None
            continue
        try:
            out[task_id] = result.get(timeout=1)
        except Exception as exc:
            out[task_id] = exc
    return out


def malformed(value: Any, word: str) -> str | None:
    """None when ``value`` is a MalformedTaskMessage mentioning ``word``; else what it is."""
    if type(value).__name__ == "MalformedTaskMessage" and word.lower() in str(value).lower():
        return None
    return "nothing stored" if value is None else f"{type(value).__name__}: {str(value)[:300]}"


TASKS = [f"{APP}.single", f"{APP}.work", f"{APP}.plain"]


@pytest.mark.parametrize("which", ["redis", "rabbitmq"])
def test_malformed_bodies_fail_by_name_and_kill_no_process(which: str, redis_broker: Broker, rabbit_broker: Broker,
                                                           tmp_path: Path) -> None:
    broker = redis_broker if which == "redis" else rabbit_broker
    w = start(broker, tmp_path, devices="fake:2", env={"TEST_BATCH": "4"})
    try:
        pids = set(w.child_pids())
        sent: dict[str, tuple[str, str]] = {}
        for name in TASKS:
            for label, body, word in SHAPES:
                sent[publish(w, name, json.dumps(body).encode(), JSON, "utf-8")] = (f"{name} {label}", word)
            for label, raw, content_type, encoding, word in REFUSED:
                sent[publish(w, name, raw, content_type, encoding)] = (f"{name} {label}", word)
        # No task name in the headers (Celery's "unknown message"), and a bad ETA (Celery's own InvalidTaskError).
        sent[publish(w, None, b"[[1], {}, {}]", JSON, "utf-8")] = ("no task name", "name no task")
        sent[publish(w, TASKS[0], b"[[1], {}, {}]", JSON, "utf-8", eta="not a date")] = ("bad eta", "ETA")
        got = failures(w, list(sent))
        wrong = {what: bad for task_id, (what, word) in sent.items() if (bad := malformed(got[task_id], word))}
        assert not wrong, f"{len(wrong)} of {len(sent)}: {json.dumps(wrong, indent=1)}\n{w.log()[-3000:]}"
        # No device process died of any of it, and the worker still serves both kinds of task.
        assert set(w.child_pids()) == pids, w.log()[-3000:]
        assert "exited with" not in w.log(), w.log()[-3000:]
        assert task(w, "single").delay(7).get(timeout=30)["item"] == 7
        assert task(w, "work", batch=4).delay(8).get(timeout=30)["item"] == 8
    finally:
        assert w.stop() == 0, w.log()[-3000:]


def test_a_malformed_item_fails_alone_in_its_batch(redis_broker: Broker, tmp_path: Path) -> None:
    """A body that the main process passes (its skeleton is fine) but whose stored payload is not a task body
    fails by name in the device process; the items batched with it succeed."""
    w = start(redis_broker, tmp_path, devices="fake:1", env={"TEST_BATCH": "8"})
    try:
        pid = w.child_pids()[0]
        store = claims.RedisStore.from_url(redis_broker.backend_url)
        # The payload is an arrays body whose embed is not a dict; its skeleton ([[], {}, None]) is well formed.
        payload = arrays.dumps([[1], {}, "notadict"])
        skeleton = arrays.dumps([[], {}, None])
        key = store.put(payload, 600)
        ref = claims.MAGIC + msgpack.packb({"key": key, "size": len(payload),
                                            "sha256": hashlib.sha256(payload).hexdigest(), "skeleton": skeleton},
                                           use_bin_type=True)
        work = task(w, "work", batch=8)
        busy = work.apply_async((100,), {"pause": 1.0})  # holds the process: what follows waits and batches
        bad = publish(w, f"{APP}.work", ref, arrays.CONTENT_TYPE, "binary")
        good = work.submit_many(range(6))
        assert malformed(failures(w, [bad])[bad], "embed") is None, w.log()[-3000:]
        assert [r.get(timeout=30)["item"] for r in good.results] == list(range(6))
        assert busy.get(timeout=30)["item"] == 100
        batch = [e["ids"] for e in ledger(w) if good.results[0].id in e["ids"]][0]
        assert set(batch) == {r.id for r in good.results}, "the bad item was not called, its batch-mates were"
        assert w.child_pids() == [pid], w.log()[-3000:]
    finally:
        assert w.stop() == 0, w.log()[-3000:]
