"""Dense sentence embeddings with all-MiniLM-L6-v2 (mean pooling, L2-normalized).

Used by dense history ranking, the dense pair-retrieval option and PersonalWAB's
review similarity.  The model is a plain directory under ``models/`` (setup builds it).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

DEFAULT_ENCODER = Path(__file__).resolve().parent.parent / "models" / "all-minilm-l6-v2"


class DenseEncoder:
    """Batched mean-pooled sentence embeddings from a local encoder directory."""

    def __init__(self, path: str | Path = DEFAULT_ENCODER, device: str = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"dense encoder directory {path} has no config.json "
                                    "(run `bash scripts/setup.sh` to build models/all-minilm-l6-v2)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings ``[len(texts), dim]`` (unit norm, fp32, on CPU), in input order."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        if not out:
            return torch.zeros(0, self.model.config.hidden_size)
        return torch.cat(out)


@functools.cache
def shared_encoder(path: str = str(DEFAULT_ENCODER)) -> DenseEncoder:
    """One encoder per process (loading it is the slow part)."""
    return DenseEncoder(path)
