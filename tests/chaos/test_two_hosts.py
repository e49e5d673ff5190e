"""Two hosts, for real (issue 17, item 7): workers in two network namespaces, the brokers on the root
namespace (a third host); one worker host's link cut for 30 s mid-run, then healed.

Its work goes to the other host (Redis: once the cut worker's in-flight lease lapses; RabbitMQ: once the
broker misses its heartbeats), nothing is lost, no more tasks run twice than the cut host held, and the cut
worker reconnects and serves again. Skips, saying why, where namespaces cannot be made (not root, no
``ip``/``socat``/``redis-server``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import AMQP_URL, RABBIT_HOST, RABBIT_PORT, require
from tests.chaos.hosts import Hosts, cut_scenario, unavailable

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    why = unavailable()
    if why:
        pytest.skip(f"two hosts need network namespaces: {why}")
    require(RABBIT_HOST, RABBIT_PORT, "RabbitMQ")
    h = Hosts(2, amqp_url=AMQP_URL)
    try:
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("which", ["redis", "rabbitmq"])
def test_a_host_cut_off_for_30s_loses_nothing_and_serves_again(which: str, hosts: Hosts, tmp_path: Path) -> None:
    figures = cut_scenario(hosts, which, tmp_path, db=0 if which == "redis" else 2)
    assert figures["lost"] == 0, figures
    assert figures["in_flight_at_cut"] > 0, f"the cut came when the host held nothing: {figures}"
    assert figures["done_during_cut"], f"the cut host's work waited for it: {figures}"
    assert figures["redelivered"] > 0, figures
    assert figures["run_twice"] <= figures["in_flight_at_cut"], figures
    assert figures["reconnected"] and figures["served_after_heal"] > 0, figures
    assert figures["worker_exits"] == 0, figures
