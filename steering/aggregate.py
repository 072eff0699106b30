"""Instance-tailored steering vectors: retrieve a user's pairs for a query and aggregate.

For each query row, the user's pairs are scored against the query -- BM25 between the
query and each pair's ``prompt`` (the user-side question the pair was built from), or
cosine similarity of dense embeddings -- the top-K are kept, and their vectors are
averaged (``mean``) or weighted by ``softmax(score / temperature)`` (``softmax``).
A user's retrieval index and vector matrix are built once and cached; the queries of one
user in a batch are scored and aggregated together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from data_process.config import choose
from data_process.text import BM25
from steering.vectors import VectorStore

log = logging.getLogger(__name__)

WEIGHTINGS = ("softmax", "mean")
RETRIEVERS = ("bm25", "dense")


@dataclass
class _UserPairs:
    rows: torch.Tensor                  # store rows of this user's pairs
    vectors: dict[str, torch.Tensor]    # key -> [n_u, hidden] fp32
    bm25: BM25 | None = None
    embeddings: torch.Tensor | None = None  # [n_u, dim] unit norm (dense retriever)


class PairAggregator:
    """Per-query steering vectors from a :class:`VectorStore`.

    ``vectors(user_ids, queries)`` returns ``{key: [n, hidden]}`` fp32; a user without
    pairs gets zero rows, a logged warning, and a place in ``missing_users``.
    """

    def __init__(self, store: VectorStore, keys: list[str], top_k: int = 5, weighting: str = "softmax",
                 temperature: float = 0.1, retriever: str = "bm25", encoder=None):
        choose("weighting", weighting, {w: w for w in WEIGHTINGS})
        choose("retriever", retriever, {r: r for r in RETRIEVERS})
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if weighting == "softmax" and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.store, self.keys = store, list(keys)
        self.matrices = {k: store.get(k) for k in self.keys}  # validates keys up front
        self.top_k, self.weighting, self.temperature, self.retriever = top_k, weighting, temperature, retriever
        self._encoder = encoder
        self._rows = store.rows_by_user()
        self._cache: dict[str, _UserPairs] = {}
        self.missing_users: set[str] = set()

    @property
    def encoder(self):
        if self._encoder is None:
            from data_process.dense import shared_encoder
            self._encoder = shared_encoder()
        return self._encoder

    def _user(self, user_id: str) -> _UserPairs | None:
        if user_id in self._cache:
            return self._cache[user_id]
        rows = self._rows.get(user_id)
        if not rows:
            return None
        prompts = [str(self.store.index[i]["prompt"]) for i in rows]
        index = torch.tensor(rows)
        entry = _UserPairs(index, {k: m[index] for k, m in self.matrices.items()})
        if self.retriever == "bm25":
            entry.bm25 = BM25(prompts)
        else:
            entry.embeddings = self.encoder.encode(prompts)
        self._cache[user_id] = entry
        return entry

    def _scores(self, entry: _UserPairs, queries: list[str]) -> torch.Tensor:
        """``[len(queries), n_u]`` retrieval scores (float64)."""
        if entry.bm25 is not None:
            return torch.from_numpy(np.stack([entry.bm25.scores(q) for q in queries]))
        return (self.encoder.encode(queries) @ entry.embeddings.T).double()

    def _pick(self, user_id: str, queries: list[str]):
        entry = self._user(user_id)
        if entry is None:
            return None
        scores = self._scores(entry, queries)
        k = min(self.top_k, scores.shape[1])
        top, order = torch.sort(scores, dim=1, descending=True, stable=True)
        top, order = top[:, :k], order[:, :k]
        if self.weighting == "mean":
            weights = torch.full_like(top, 1.0 / k)
        else:
            weights = torch.softmax(top / self.temperature, dim=1)
        return entry, order, weights.float()

    def select(self, user_id: str, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Top-K store rows ``[q, k]`` and their weights ``[q, k]`` (rows sum to 1) for one
        user's queries; ties keep the pairs' index order.  None when the user has no pairs."""
        picked = self._pick(user_id, queries)
        if picked is None:
            return None
        entry, order, weights = picked
        return entry.rows[order], weights

    def vectors(self, user_ids: list[str], queries: list[str]) -> dict[str, torch.Tensor]:
        """``{key: [n, hidden]}`` aggregated vectors, row i for ``(user_ids[i], queries[i])``."""
        if len(user_ids) != len(queries):
            raise ValueError(f"got {len(user_ids)} user ids for {len(queries)} queries")
        out = {k: torch.zeros(len(queries), m.shape[1]) for k, m in self.matrices.items()}
        groups: dict[str, list[int]] = {}
        for i, user in enumerate(user_ids):
            groups.setdefault(str(user), []).append(i)
        for user, rows in groups.items():
            picked = self._pick(user, [queries[i] for i in rows])
            if picked is None:
                if user not in self.missing_users:
                    log.warning("user %s has no pairs in %s: steering with a zero vector", user, self.store.path)
                self.missing_users.add(user)
                continue
            entry, order, weights = picked
            target = torch.tensor(rows)
            for key, matrix in entry.vectors.items():
                # [q, k] weights over [q, k, hidden] gathered vectors -> [q, hidden], fp32
                out[key][target] = torch.einsum("qk,qkh->qh", weights, matrix[order])
        return out
