"""Instance-tailored steering vectors: retrieve a user's pairs for a query and aggregate.

For each query row, the user's pairs are scored against the query -- BM25 between the
query and each pair's query text (the task's query of the sample the pair was built
from: article, title, request), or cosine similarity of dense embeddings -- the top-K
are kept, and their vectors are averaged (``mean``) or weighted by
``softmax(score / softmax_temperature)`` (``softmax``).

A user's retrieval index and vectors are built when the user first appears (the store
reads just that user's rows from disk) and kept in a least-recently-used cache bounded
in bytes.  All queries of one user in a batch are scored together: one sparse product
for BM25, one matrix product for dense embeddings; top-K and weights are computed in
torch for the whole group.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from data_process.config import choose
from data_process.text import BM25
from steering.vectors import VectorStore

log = logging.getLogger(__name__)

WEIGHTINGS = ("softmax", "mean")
RETRIEVERS = ("bm25", "dense")
DEFAULT_CACHE_MB = 1024


@dataclass
class _UserPairs:
    rows: torch.Tensor                  # store rows of this user's pairs
    vectors: dict[str, torch.Tensor]    # key -> [n_u, hidden] in the store's dtype
    bm25: BM25 | None = None
    embeddings: torch.Tensor | None = None  # [n_u, dim] unit norm (dense retriever)

    @property
    def nbytes(self) -> int:
        return sum(v.element_size() * v.nelement() for v in self.vectors.values())


def pair_text(record: dict) -> str:
    """The text a pair is retrieved by: its sample's query text, or (stores made before
    pairs carried it) the pair's history-free prompt."""
    return str(record["query"] if "query" in record else record["prompt"])


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices of the ``k`` best scores of each row, best first; equal scores
    keep index order (as a stable descending sort would)."""
    values, order = torch.topk(scores, k, dim=1)
    # topk leaves the order among equal values open: sort the picks by index, then
    # stably by score.  A tie that straddles the cut needs the whole row sorted.
    order = order.sort(dim=1).values
    values, perm = scores.gather(1, order).sort(dim=1, descending=True, stable=True)
    order = order.gather(1, perm)
    straddles = ((scores >= values[:, -1:]).sum(1) > k).nonzero().squeeze(1)
    if len(straddles):
        full, full_order = torch.sort(scores[straddles], dim=1, descending=True, stable=True)
        values[straddles], order[straddles] = full[:, :k], full_order[:, :k]
    return values, order


class PairAggregator:
    """Per-query steering vectors from a :class:`VectorStore`.

    ``vectors(user_ids, queries)`` returns ``{key: [n, hidden]}`` fp32; a user without
    pairs gets zero rows, a logged warning, and a place in ``missing_users``.  At most
    ``cache_mb`` MB of users' vectors stay in memory (the least recently used user goes
    first; the user being served always stays).
    """

    def __init__(self, store: VectorStore, keys: list[str], top_pairs: int = 5, pair_weighting: str = "softmax",
                 softmax_temperature: float = 0.1, retriever: str = "bm25", encoder=None,
                 cache_mb: float = DEFAULT_CACHE_MB):
        choose("pair weighting", pair_weighting, {w: w for w in WEIGHTINGS})
        choose("retriever", retriever, {r: r for r in RETRIEVERS})
        if top_pairs < 1:
            raise ValueError(f"top_pairs must be >= 1, got {top_pairs}")
        if pair_weighting == "softmax" and softmax_temperature <= 0:
            raise ValueError(f"softmax_temperature must be > 0, got {softmax_temperature}")
        missing = [k for k in keys if k not in store.keys]
        if missing:
            raise ValueError(f"{store.path}: key(s) {missing} not loaded; available {sorted(store.keys)}")
        self.store, self.keys = store, list(keys)
        self.top_pairs, self.pair_weighting, self.softmax_temperature = top_pairs, pair_weighting, softmax_temperature
        self.retriever = retriever
        self.cache_bytes = int(cache_mb * 2**20)
        self._encoder = encoder
        self._rows = store.rows_by_user()
        self._cache: OrderedDict[str, _UserPairs] = OrderedDict()
        self.missing_users: set[str] = set()
        if store.index and "query" not in store.index[0]:
            log.warning("%s: pairs carry no 'query' field (made before it existed): retrieving them by their "
                        "prompt; re-run stages 03-04 to retrieve by the task's query text", store.path)

    @property
    def encoder(self):
        if self._encoder is None:
            from data_process.dense import shared_encoder
            self._encoder = shared_encoder()
        return self._encoder

    def _user(self, user_id: str) -> _UserPairs | None:
        if user_id in self._cache:
            self._cache.move_to_end(user_id)
            return self._cache[user_id]
        rows = self._rows.get(user_id)
        if not rows:
            return None
        texts = [pair_text(self.store.index[i]) for i in rows]
        entry = _UserPairs(torch.tensor(rows), {k: self.store.read(k, rows) for k in self.keys})
        if self.retriever == "bm25":
            entry.bm25 = BM25(texts)
        else:
            entry.embeddings = self.encoder.encode(texts)
        self._cache[user_id] = entry
        while len(self._cache) > 1 and sum(e.nbytes for e in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return entry

    def _scores(self, entry: _UserPairs, queries: list[str]) -> torch.Tensor:
        """``[len(queries), n_u]`` retrieval scores (float64)."""
        if entry.bm25 is not None:
            return torch.from_numpy(entry.bm25.batch_scores(queries))
        return (self.encoder.encode(queries) @ entry.embeddings.T).double()

    def _pick(self, user_id: str, queries: list[str]):
        entry = self._user(user_id)
        if entry is None:
            return None
        scores = self._scores(entry, queries)
        k = min(self.top_pairs, scores.shape[1])
        top, order = top_k(scores, k)
        if self.pair_weighting == "mean":
            weights = torch.full_like(top, 1.0 / k)
        else:
            weights = torch.softmax(top / self.softmax_temperature, dim=1)
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
        out = {k: torch.zeros(len(queries), self.store.hidden_size) for k in self.keys}
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
                # [q, 1, k] weights x [q, k, hidden] gathered vectors -> [q, hidden], fp32
                out[key][target] = torch.bmm(weights.unsqueeze(1), matrix[order].float()).squeeze(1)
        return out
