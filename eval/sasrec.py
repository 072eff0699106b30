"""SASRec, the sequential recommender behind PersonalWAB's ``get_recommendations_by_history``.

Self-attentive sequential recommendation (Kang & McAuley, 2018): item embeddings (scaled
by sqrt(hidden)) plus learned positional embeddings go through pre-norm causal
self-attention blocks with point-wise feed-forward layers; the hidden state at position
t scores every item as the next one by a dot product with the (shared) item embeddings.
This module is what the tool environment needs at evaluation time: the model, its
checkpoint format and the recommender; the trainer is :mod:`train.sasrec`.

A checkpoint is a directory: ``model.safetensors`` (state dict) and ``config.json``
(:class:`SASRecConfig`, the item id map -- index i+1 is ``item_ids[i]``, 0 is padding --
and the training summary).  Any checkpoint with that layout loads; a mismatch between
the config and the tensors is a clear error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data_process.artifact_io import read_json, write_json

WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclass
class SASRecConfig:
    num_items: int
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2


class _Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.attn = nn.MultiheadAttention(cfg.hidden, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, cfg.hidden), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, causal: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        # the normalized sequence is the query; keys/values are the residual stream
        attended, _ = self.attn(q, x, x, attn_mask=causal, need_weights=False)
        x = q + attended
        x = self.ffn_norm(x)
        return (x + self.ffn(x)) * keep


class SASRec(nn.Module):
    """Item ids ``[batch, L]`` (0 = left padding) -> hidden states ``[batch, L, hidden]``."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.blocks))
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=1e-8)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        length = seq.shape[1]
        keep = (seq != 0).unsqueeze(-1).float()
        x = self.item_emb(seq) * math.sqrt(self.cfg.hidden)
        x = self.dropout(x + self.pos_emb(torch.arange(length, device=seq.device)))
        x = x * keep
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), diagonal=1)
        for block in self.blocks:
            x = block(x, causal, keep)
        return self.final_norm(x)

    def item_scores(self, seq: torch.Tensor) -> torch.Tensor:
        """Score of every item (column i = item id i+1) as the next one after ``seq``."""
        last = self.forward(seq)[:, -1]
        return last @ self.item_emb.weight[1:].T


def save_sasrec(model: SASRec, item_ids: list[str], out_dir: str | Path, **summary) -> None:
    """Write a checkpoint directory (weights, config, item id map, ``summary``) that :func:`load_sasrec` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt", "model": "SASRec"})
    write_json(out_dir / CONFIG, {"model": "SASRec", "config": dataclasses.asdict(model.cfg),
                                  "item_ids": item_ids, "summary": summary})


def load_sasrec(path: str | Path, device: str = "cpu") -> tuple[SASRec, list[str]]:
    """Load a checkpoint directory written by :func:`save_sasrec` (or with its layout)."""
    path = Path(path)
    if not (path / CONFIG).exists() or not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"no SASRec checkpoint in {path} (needs {CONFIG} and {WEIGHTS}); "
                                "train one with `python -m scripts.train_sasrec --config configs/pwab.json`")
    meta = read_json(path / CONFIG)
    try:
        cfg = SASRecConfig(**meta["config"])
        item_ids = list(meta["item_ids"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path / CONFIG}: not a SASRec config ({err})") from None
    if len(item_ids) != cfg.num_items:
        raise ValueError(f"{path / CONFIG}: {len(item_ids)} item ids but num_items={cfg.num_items}")
    model = SASRec(cfg)
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except RuntimeError as err:
        raise ValueError(f"{path / WEIGHTS} does not match {path / CONFIG}: {err}") from None
    return model.to(device).eval(), item_ids


class SASRecRecommender:
    """Top-k next items for an asin sequence; asins unknown to the model are dropped."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.model, self.item_ids = load_sasrec(path, device)
        self.index = {a: i + 1 for i, a in enumerate(self.item_ids)}
        self.device = device

    @torch.no_grad()
    def recommend(self, product_sequence: list[str], k: int = 10) -> list[str]:
        ids = [self.index[a] for a in product_sequence if isinstance(a, str) and a in self.index]
        if not ids:  # nothing known to condition on: no recommendation (the call fails)
            return []
        ids = ids[-self.model.cfg.max_len:]
        seq = torch.tensor([[0] * (self.model.cfg.max_len - len(ids)) + ids], device=self.device)
        scores = self.model.item_scores(seq)[0]
        top = torch.topk(scores, min(k, len(self.item_ids))).indices.tolist()
        return [self.item_ids[i] for i in top]

