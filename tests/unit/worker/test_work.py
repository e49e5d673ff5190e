"""A job, a batch and a slot on their own: the frames they make, their limits, terminate, exit wording."""

from __future__ import annotations

import signal
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest

from celery_gpu.devices import Device
from celery_gpu.worker.process import MOVES, Slot, exit_status
from celery_gpu.worker.work import Batch, Job

# -- exit_status and Job --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "wording"),
    [(-9, "signal 9 (SIGKILL)"), (-15, "signal 15 (SIGTERM)"), (-11, "signal 11 (SIGSEGV)"), (1, "exitcode 1"),
     (0, "exitcode 0"), (3, "exitcode 3"), (None, "unknown exit status"), (-200, "signal 200")],
)
def test_exit_status(code: int | None, wording: str) -> None:
    assert exit_status(code) == wording


def _job(body: Any = b"[[1], {}, {}]", soft: float | None = None, hard: float | None = None) -> Job:
    request = {"id": "abc", "task": "t.add", "headers": {}}
    return Job(5, ("t.add", "abc", request, body, "application/json", "utf-8"), 1024, None, None, None, None,
               soft, hard)


def test_job_frame() -> None:
    job = _job()
    assert job.frame() == {"t": "run", "job": 5, "name": "t.add", "uuid": "abc",
                           "request": {"id": "abc", "task": "t.add", "headers": {}}, "body": b"[[1], {}, {}]",
                           "content_type": "application/json", "content_encoding": "utf-8"}


def test_job_frame_leaves_out_the_arguments_celery_decoded() -> None:
    # Celery's request dict holds the decoded args and kwargs; the device process decodes the body itself, and
    # a numpy array among them would be packed as its (milliseconds-long) repr.
    request = {"id": "abc", "task": "t.add", "headers": {}, "args": [[1.0] * 512], "kwargs": {"k": 1}}
    job = Job(5, ("t.add", "abc", request, b"[[1], {}, {}]", "application/json", "utf-8"), 0, None, None, None,
              None, None, None)
    assert job.frame()["request"] == {"id": "abc", "task": "t.add", "headers": {}}
    assert "args" in request and "kwargs" in request  # Celery's own dict is left as it was


class _Message:
    def __init__(self, payload: Any) -> None:
        self._decoded_cache = payload


class _Request:  # what the pool knows of Celery's Request: its accept callback's owner, with its message
    def __init__(self, payload: Any) -> None:
        self.message = _Message(payload)

    def on_accepted(self, *args: Any) -> None:
        pass


def _json_job(payload: Any) -> Job:
    body = b"the JSON body"  # not read: the decoded payload is used where msgpack carries it exactly
    return Job(5, ("t.add", "abc", {"id": "abc"}, body, "application/json", "utf-8"), 0, None,
               _Request(payload).on_accepted, None, None, None, None)


def test_a_json_body_goes_to_the_device_process_decoded_once() -> None:
    import msgpack

    from celery_gpu.wire import protocol

    payload = [[[0.5] * 512, "x", b"raw", None, 2**63], {"k": {"n": 1}}, {"callbacks": None, "chain": None}]
    frame = _json_job(payload).frame()
    assert frame["content_type"] == protocol.DECODED and frame["content_encoding"] == "binary"
    assert msgpack.unpackb(frame["body"], raw=False) == payload


@pytest.mark.parametrize("odd", [datetime(2026, 1, 1, tzinfo=timezone.utc), uuid.uuid4(), 2**70, "\ud800"])
def test_a_json_body_msgpack_cannot_carry_exactly_goes_as_it_came(odd: Any) -> None:
    frame = _json_job([[odd], {}, None]).frame()
    assert (frame["body"], frame["content_type"]) == (b"the JSON body", "application/json")


def test_job_frame_turns_a_memoryview_body_into_bytes() -> None:
    frame = _job(body=memoryview(b"[[1], {}, {}]")).frame()
    assert type(frame["body"]) is bytes
    assert frame["body"] == b"[[1], {}, {}]"


def test_job_time_limits_zero_means_none() -> None:
    job = _job(soft=0, hard=0)
    assert (job.soft, job.hard) == (None, None)
    job = _job(soft=1.5, hard=3)
    assert (job.soft, job.hard) == (1.5, 3)


def test_job_terminate_and_worker_pids() -> None:
    job = _job()
    assert job.worker_pids() == []
    job.terminate()
    assert job.terminated == signal.SIGTERM
    job.terminate(signal.SIGKILL)
    assert job.terminated == signal.SIGKILL
    slot = Slot(Device(0, "fake", "fake-0", 1), 1)
    slot.pid = 4321
    job.slot = slot
    assert job.worker_pids() == [4321]
    assert slot.label == "fake:0#1"


_seq = iter(range(1, 1 << 30))


def job(name: str = "t", memory: int = 0, soft: float | None = None, hard: float | None = None) -> Job:
    args = (name, uuid.uuid4().hex, {}, b"[]", "application/json", "utf-8")
    return Job(next(_seq), args, memory, None, None, None, None, soft, hard)


def test_a_batch_takes_its_items_largest_memory_and_limits() -> None:
    jobs = [job(memory=1, soft=2.0, hard=5.0), job(memory=3), job(memory=2, soft=4.0, hard=None)]
    batch = Batch(7, jobs)
    assert batch.memory == 3 and batch.soft == 4.0 and batch.hard == 5.0
    frame = batch.frame()
    assert frame["t"] == "batch" and frame["job"] == 7 and len(frame["items"]) == 3
    assert batch.terminated is None
    jobs[0].terminated = signal.SIGTERM
    assert batch.terminated is None, "one item revoked: the call goes on for the others"
    batch.terminate(signal.SIGKILL)
    assert batch.terminated == signal.SIGKILL


# -- a slot's states -------------------------------------------------------------------------------------------


def test_every_state_has_its_moves() -> None:
    states = {"stopped", "starting", "idle", "busy", "recycling", "down", "failed"}
    assert set(MOVES) == states
    assert all(targets <= states for targets in MOVES.values())
    assert MOVES["failed"] == {"failed"}, "a quarantined slot is never used again"


def test_a_slot_takes_work_only_once_ready_and_gives_it_back_once() -> None:
    slot = Slot(Device(0, "fake", "fake-0", 1), 0)
    assert slot.state == "stopped" and not slot.ready(123, 0), "ready only counts while starting"
    slot.state = "starting"
    assert slot.ready(123, 7) and (slot.state, slot.pid, slot.mem) == ("idle", 123, 7)
    work = job()
    slot.begin(work)
    assert slot.state == "busy" and slot.job is work and work.slot is slot
    assert slot.detach() is work and work.finished
    assert slot.detach() is None, "detached once"
    slot.finish()
    assert slot.state == "idle"


def test_a_ready_frame_after_quarantine_is_ignored() -> None:
    slot = Slot(Device(0, "fake", "fake-0", 1), 0)
    slot.state = "starting"
    slot.quarantine()
    assert slot.state == "failed" and not slot.ready(5, 0) and slot.state == "failed"


def test_a_move_off_the_table_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    slot = Slot(Device(0, "fake", "fake-0", 1), 0)
    with caplog.at_level("ERROR", logger="celery_gpu.pool"):
        slot.finish()  # stopped -> idle is not a move
    assert slot.state == "idle" and "not one of its moves" in caplog.text
