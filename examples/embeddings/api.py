"""The HTTP side: a FastAPI app that sends each request's texts to the Celery workers and waits for the results
without blocking its event loop (:class:`~examples.embeddings.bridge.CeleryBridge`).

Run it (from the directory that holds ``examples/``; same ``EMBED_*`` settings as the worker)::

    uvicorn examples.embeddings.api:app --port 8000

Endpoints:

- ``POST /embed`` ``{"texts": ["a sentence", ...]}`` → ``{"model", "dim", "embeddings": [[384 floats], ...]}``.
  Each text is its own Celery task (sent with ``submit_many``); the worker batches them with other requests'.
- ``POST /search`` ``{"query": "...", "documents": ["...", ...], "top_k": 5}`` →
  ``{"model", "results": [{"index", "score", "text"}, ...]}``, best first.
- ``GET /health`` → 200 ``{"status": "ok", "workers": [...]}`` when a worker answers a ping, else 503.

A request that no worker answers within ``EMBED_TIMEOUT`` seconds (10) gets 503 with a body that says so, and
its tasks expire unrun (Celery's ``expires``): a worker that comes back later does not compute answers no one
will read. A body that is not valid gets 422, naming the field (FastAPI's validation). A task that fails gets
500 with its error.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .bridge import CeleryBridge, NoAnswer, TaskFailed
from .model import DIM, MODEL_NAME
from .worker import app as celery_app
from .worker import embed, search

TIMEOUT_S = float(os.environ.get("EMBED_TIMEOUT", "10"))
MAX_TEXTS = 256  # texts per /embed request
MAX_DOCUMENTS = 1000  # documents per /search request
MAX_CHARS = 20_000  # characters per text (the model reads its first 256 tokens)
PING_TIMEOUT_S = 1.0

Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHARS)]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: Text
    documents: list[Text] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    top_k: int = Field(5, ge=1, le=MAX_DOCUMENTS)


class Hit(BaseModel):
    index: int
    score: float
    text: str


class SearchResponse(BaseModel):
    model: str
    results: list[Hit]


bridge = CeleryBridge(celery_app)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    bridge.start()
    try:
        yield
    finally:
        bridge.stop()


app = FastAPI(title="Sentence embeddings (celery-gpu example)", lifespan=lifespan)


async def _wait(send: Any) -> list[Any]:
    """The values of the tasks ``send()`` sends, or the HTTP error that says why there are none."""
    try:
        return await bridge.run(send, TIMEOUT_S)
    except NoAnswer as exc:
        raise HTTPException(503, f"no worker answered within {TIMEOUT_S:g} s ({exc}); the request's tasks expire "
                                 "unrun. Is a worker running on this broker and queue?",
                            headers={"Retry-After": "5"}) from None
    except TaskFailed as exc:
        raise HTTPException(500, f"the task failed: {exc.error}") from None
    except OSError as exc:  # kombu's connection errors, after Celery's publish retries
        raise HTTPException(503, f"the broker could not be reached: {exc}", headers={"Retry-After": "5"}) from None


@app.post("/embed", response_model=EmbedResponse)
async def embed_texts(body: EmbedRequest) -> dict[str, Any]:
    """One 384-float unit vector per text, in order."""
    vectors = await _wait(lambda: embed.submit_many(body.texts, expires=TIMEOUT_S).results)
    return {"model": MODEL_NAME, "dim": DIM, "embeddings": vectors}


@app.post("/search", response_model=SearchResponse)
async def search_documents(body: SearchRequest) -> dict[str, Any]:
    """The ``top_k`` documents closest to the query (cosine similarity), best first."""
    (hits,) = await _wait(lambda: [search.apply_async((body.query, body.documents, body.top_k), expires=TIMEOUT_S)])
    return {"model": MODEL_NAME,
            "results": [{"index": h["index"], "score": h["score"], "text": body.documents[h["index"]]} for h in hits]}


@app.get("/health")
async def health() -> dict[str, Any]:
    """200 with the workers that answered a ping, 503 when none did within a second."""
    try:
        replies = await asyncio.to_thread(celery_app.control.ping, timeout=PING_TIMEOUT_S)
    except OSError as exc:
        raise HTTPException(503, f"the broker could not be reached: {exc}") from None
    workers = sorted(name for reply in replies for name in reply)
    if not workers:
        raise HTTPException(503, f"no worker answered a ping within {PING_TIMEOUT_S:g} s")
    return {"status": "ok", "workers": workers, "model": MODEL_NAME}
