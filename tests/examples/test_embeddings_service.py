"""The sentence-embedding example end to end: a real worker (celery-gpu pool, the CPU device, the model loaded in
its device process) and the FastAPI app under uvicorn, called over HTTP.

The tests share one service (module fixture); the last one stops its worker.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.examples.conftest import SHORT_TIMEOUT_S, Service, start_api

pytestmark = pytest.mark.broker
ATOL = 1e-5  # float32 rounding; texts padded to a batch's longest one change the last bits only


def corpus(count: int, seed: int = 0) -> list[str]:
    from examples.embeddings.corpus import sentences

    return sentences(count, seed)


def post(service: Service, path: str, body: Any, **kwargs: Any) -> Any:
    import httpx

    return httpx.post(f"{service.url}{path}", json=body, timeout=60, **kwargs)


def test_embeddings_equal_the_in_process_model(service: Service, reference: Any) -> None:
    texts = [*corpus(30), "Ünïcödé ✓ — naïve café", "x", "word " * 600]  # the last one is cut at 256 tokens
    response = post(service, "/embed", {"texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dim"] == 384 and body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    got = np.asarray(body["embeddings"], dtype=np.float32)
    assert got.shape == (len(texts), 384)
    np.testing.assert_allclose(got, reference.encode(texts), rtol=0, atol=ATOL)


def test_search_ranks_documents_by_cosine_similarity(service: Service, reference: Any) -> None:
    documents = ["The cat sat on the warm windowsill.", "Interest rates rose again this quarter.",
                 "A kitten chased a ball of yarn.", "The train to Paris was delayed.", "Dogs bark at the postman."]
    query = "a small cat playing"
    response = post(service, "/search", {"query": query, "documents": documents, "top_k": 3})
    assert response.status_code == 200, response.text
    hits = response.json()["results"]
    vectors = reference.encode([query, *documents])
    scores = vectors[1:] @ vectors[0]
    expected = np.argsort(-scores)[:3]
    assert [h["index"] for h in hits] == list(expected)
    assert [h["text"] for h in hits] == [documents[i] for i in expected]
    np.testing.assert_allclose([h["score"] for h in hits], scores[expected], rtol=0, atol=ATOL)
    assert hits[0]["text"] == "A kitten chased a ball of yarn."


def test_200_concurrent_requests_are_all_answered_each_with_its_own_text(service: Service, reference: Any) -> None:
    import httpx

    texts = corpus(200, seed=7)

    async def all_at_once() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=limits) as client:
            return list(await asyncio.gather(*(client.post("/embed", json={"texts": [t]}) for t in texts)))

    before = service.worker.pool_stats()
    responses = asyncio.run(all_at_once())
    assert [r.status_code for r in responses] == [200] * 200, [r.text for r in responses if r.status_code != 200]
    got = np.asarray([r.json()["embeddings"][0] for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, reference.encode(texts), rtol=0, atol=ATOL)  # no answer went to another request
    after = service.worker.pool_stats()
    assert before is not None and after is not None

    def counts(stats: dict[str, Any]) -> tuple[int, int]:
        embed = stats["batching"].get("embeddings.embed", {})
        return int(embed.get("items", 0)), int(embed.get("batches", 0))

    items = counts(after)[0] - counts(before)[0]
    batches = counts(after)[1] - counts(before)[1]
    assert items == 200 and batches < items, (items, batches)  # requests' texts were coalesced into batches


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/embed", {}, "texts"),
    ("/embed", {"texts": []}, "texts"),
    ("/embed", {"texts": "one string, not a list"}, "texts"),
    ("/embed", {"texts": [1, 2]}, "texts"),
    ("/embed", {"texts": [""]}, "texts"),
    ("/embed", {"texts": ["a"] * 257}, "texts"),
    ("/embed", {"texts": ["a"], "normalize": False}, "normalize"),
    ("/search", {"query": "q", "documents": ["d"], "top_k": 0}, "top_k"),
    ("/search", {"documents": ["d"]}, "query"),
])
def test_a_bad_body_gets_422_naming_the_field(service: Service, path: str, body: Any, field: str) -> None:
    response = post(service, path, body)
    assert response.status_code == 422, response.text
    assert any(field in error["loc"] for error in response.json()["detail"]), response.text


def test_a_body_that_is_not_json_gets_422(service: Service) -> None:
    import httpx

    response = httpx.post(f"{service.url}/embed", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


def test_health_names_the_worker(service: Service) -> None:
    import httpx

    response = httpx.get(f"{service.url}/health", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["workers"] == [service.worker.name]


def test_worker_down_gets_503_within_the_timeout(service: Service, tmp_module: Path) -> None:
    """Last in the module: stops the worker. An API with a 4 s timeout on the same queue answers 503 in 4 s."""
    import httpx

    assert service.worker.stop() == 0, service.log()
    api, url, log = start_api({**service.worker.env, "EMBED_TIMEOUT": str(SHORT_TIMEOUT_S)}, tmp_module / "api2.log")
    try:
        deadline = time.monotonic() + 30
        while not _answers(url):
            assert api.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        started = time.monotonic()
        response = httpx.post(f"{url}/embed", json={"texts": ["is anyone there?"]}, timeout=60)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert "no worker answered within" in response.json()["detail"]
        assert response.headers["retry-after"]
        assert SHORT_TIMEOUT_S - 0.5 <= elapsed <= SHORT_TIMEOUT_S + 3, elapsed
        # The unanswered task waits in the queue with an expiry, so a worker that comes back discards it unrun.
        with service.worker.app.connection_for_read() as conn:
            raw = conn.default_channel.client.lrange(service.worker.queue, 0, -1)
        waiting = [json.loads(m)["headers"] for m in raw]
        assert [h["task"] for h in waiting] == ["embeddings.embed"] and waiting[0]["expires"], waiting
        for base in (url, service.url):  # both APIs keep serving, and say that no worker answers
            health = httpx.get(f"{base}/health", timeout=10)
            assert health.status_code == 503 and "no worker answered" in health.json()["detail"]
    finally:
        api.terminate()
        api.wait(15)


def _answers(url: str) -> bool:
    import httpx

    try:
        httpx.get(f"{url}/openapi.json", timeout=2)
        return True
    except httpx.HTTPError:
        return False
