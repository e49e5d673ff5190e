"""The embedding example on RabbitMQ with ``rpc://`` results (the worker's default for an ``amqp://`` broker): the
results come back over the broker to the API's bridge, which sent the tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.brokers import AMQP_URL, RABBIT_HOST, RABBIT_PORT, Broker, require
from tests.examples.conftest import Service, require_example_packages, start_service, stop_service, wait_service

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def rabbit_service(tmp_module: Path) -> Iterator[Service]:
    require_example_packages()
    require(RABBIT_HOST, RABBIT_PORT, "RabbitMQ")
    running = start_service(Broker("rabbitmq", AMQP_URL, "rpc://"), tmp_module)
    try:
        wait_service(running)
        yield running
    finally:
        stop_service(running)


def test_concurrent_requests_over_rabbitmq_and_rpc_results(rabbit_service: Service, reference: Any) -> None:
    import httpx

    from examples.embeddings.corpus import sentences

    texts = sentences(60, seed=3)

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=rabbit_service.url, timeout=120) as client:
            singles = [client.post("/embed", json={"texts": [t]}) for t in texts[:50]]
            return list(await asyncio.gather(*singles, client.post("/embed", json={"texts": texts[50:]})))

    responses = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 51, [r.text for r in responses if r.status_code != 200]
    got = [r.json()["embeddings"][0] for r in responses[:50]] + responses[50].json()["embeddings"]
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), reference.encode(texts), rtol=0, atol=1e-5)
