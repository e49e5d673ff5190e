"""The embedding example on a real GPU: the worker's device process runs all-MiniLM-L6-v2 on ``cuda:0`` behind the
FastAPI app; its answers equal sentence-transformers' on the same GPU, and the worker's main process holds no
CUDA context (run only where a CUDA GPU, torch with CUDA and the example's packages are present)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from celery_gpu.devices import discover
from tests.brokers import make
from tests.examples.conftest import start_service, stop_service, wait_service
from tests.gpu.cuda_free import assert_cuda_free

GPUS = [d for d in discover("all") if d.kind == "cuda"]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPUS, reason="no CUDA GPU (NVML found none)"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torch", "fastapi", "uvicorn", "httpx",
                                                                          "sentence_transformers")),
                       reason="the example's packages are not installed"),
]


def test_the_embedding_service_runs_the_model_on_the_gpu(embedded_url: str, tmp_path: Path) -> None:
    import httpx
    from sentence_transformers import SentenceTransformer

    from examples.embeddings.corpus import sentences
    from examples.embeddings.model import model_dir

    service = start_service(make("embedded", embedded_url), tmp_path, devices=str(GPUS[0].index))
    try:
        wait_service(service)
        texts = sentences(300, seed=11)

        async def all_at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=service.url, timeout=120,
                                         limits=httpx.Limits(max_connections=300)) as client:
                return list(await asyncio.gather(*(client.post("/embed", json={"texts": [t]}) for t in texts)))

        responses = asyncio.run(all_at_once())
        assert [r.status_code for r in responses] == [200] * len(texts)
        got = np.asarray([r.json()["embeddings"][0] for r in responses], dtype=np.float32)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        reference = SentenceTransformer(str(model_dir()), device="cuda").float()  # as the worker: float32
        want = reference.encode(texts)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        pool = service.worker.pool_stats()
        assert pool is not None
        assert [d["device"] for d in pool["devices"]] == [GPUS[0].label], pool
        assert {s["cuda_visible_devices"] for d in pool["devices"] for s in d["slots"]} == {str(GPUS[0].index)}
        assert service.worker.proc is not None
        assert_cuda_free(service.worker.proc.pid, service.worker.child_pids())
    finally:
        stop_service(service)
