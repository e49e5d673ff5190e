"""The autoscaling rule of ``celery-gpu status --autoscale``, on hand-made snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from celery_gpu.cli.autoscale import recommend


def worker(backlog: dict[str, int | None], waiting: int = 0, fill: float | None = None) -> dict[str, Any]:
    return {"scaling": {"queues": backlog, "sampled_at": 1.0,
                        "tasks": {"proj.embed": {"waiting": waiting, "batch_fill": fill, "item_memory": 2**20}}}}


def test_demand_counts_each_queue_once_and_the_pools() -> None:
    # Both workers sample the same broker queue: it counts once (the larger sample), their pools add up.
    cluster = {"a": worker({"gpu": 1000}, waiting=30), "b": worker({"gpu": 990}, waiting=20)}
    advice = recommend(cluster, per_worker=256)
    assert (advice["backlog"], advice["waiting"]) == (1000, 50)
    assert (advice["current"], advice["desired"]) == (2, 5)  # ceil(1050 / 256)
    assert "1050 items waiting" in advice["reason"]


def test_an_idle_cluster_shrinks_to_the_minimum_but_not_while_saturated() -> None:
    idle = {"a": worker({"gpu": 0}), "b": worker({"gpu": None}), "c": worker({"gpu": 0}, fill=0.2)}
    assert recommend(idle, per_worker=100, minimum=1)["desired"] == 1
    assert recommend(idle, per_worker=100, minimum=0)["desired"] == 0
    busy = {"a": worker({"gpu": 10}, fill=0.95), "b": worker({"gpu": 0}), "c": worker({"gpu": 0})}
    advice = recommend(busy, per_worker=100)
    assert advice["desired"] == 3 and "saturated" in advice["reason"]


def test_the_maximum_caps_the_advice() -> None:
    advice = recommend({"a": worker({"gpu": 10_000})}, per_worker=100, maximum=8)
    assert advice["desired"] == 8 and "clamped to [1, 8]" in advice["reason"]


def test_snapshots_from_older_workers_count_as_no_signal() -> None:
    advice = recommend({"old": {"devices": []}, "odd": {"scaling": {"queues": {"q": "x"}, "tasks": {"t": 3}}}},
                       per_worker=10)
    assert (advice["backlog"], advice["waiting"], advice["desired"], advice["batch_fill"]) == (0, 0, 1, None)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        recommend({}, per_worker=0)
    with pytest.raises(ValueError):
        recommend({}, per_worker=1, minimum=5, maximum=2)
