"""History ranking: re-sort each sample's history by relevance to its input.

Rankers are chosen by name (:data:`RANKERS`); each maps a list of samples to, per
sample, the history order (most relevant first) and one score per item:

* ``bm25`` (default) -- :class:`data_process.text.BM25` over the sample's own history
  (tokenizer: lowercase, split on anything not a letter or digit);
* ``recency`` -- newest first by the items' dates (:mod:`data_process.timeline`; list
  order when undated); score = the share of the history not newer than the item, so
  items of the same date score the same and keep time order;
* ``dense`` -- cosine similarity of all-MiniLM-L6-v2 embeddings (mean pooling), every
  distinct text encoded once, in batches.

The query is the task's query text of the sample (``Task.query``: the article, the title,
the request -- never the instruction words, which would match nothing useful); a history
item's text is its input and output joined.  Ranking is deterministic and ties keep time
order (the older item first).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import numpy as np

from data_process.config import choose
from data_process.progress import tqdm
from data_process.text import BM25, tokenize
from data_process.timeline import time_keys

Ranking = list[tuple[list[int], list[float]]]
Query = Callable[[dict], str]  # sample -> the text its history is ranked against


def sample_input(sample: dict) -> str:
    """The default query: the sample's whole input."""
    return sample["input"]


def item_text(item: dict[str, Any]) -> str:
    """The text of a history item that a query is matched against."""
    return f"{item['input']} {item['output']}"


def order_by(scores: np.ndarray) -> list[int]:
    """Indices by descending score; equal scores keep time (index) order."""
    return np.argsort(-scores, kind="stable").tolist()


def _finish(scores: np.ndarray) -> tuple[list[int], list[float]]:
    order = order_by(scores)
    return order, [round(float(scores[i]), 6) for i in order]


def rank_bm25(samples: list[dict], *, query: Query = sample_input, **_: Any) -> Ranking:
    """BM25 of the query against the sample's own history items.

    A user's items recur in the histories of all their samples, so each distinct item
    text is tokenized once per call.
    """
    tokens: dict[str, list[str]] = {}
    out = []
    for s in tqdm(samples, desc="rank bm25", leave=False):
        docs = []
        for text in map(item_text, s["history"]):
            if text not in tokens:
                tokens[text] = tokenize(text)
            docs.append(tokens[text])
        out.append(_finish(BM25(docs).scores(query(s))))
    return out


def rank_recency(samples: list[dict], **_: Any) -> Ranking:
    """Newest first by date; undated histories by list (time) order, oldest first."""
    out = []
    for s in samples:
        keys = time_keys(s["history"])
        ordered = sorted(keys)
        # bisect_right: how many items are not newer than this one.
        not_newer = np.array([bisect.bisect_right(ordered, k) for k in keys], dtype=np.float64)
        out.append(_finish(not_newer / max(len(keys), 1)))
    return out


def dense_vectors(texts: list[str], encoder: Any, batch_size: int,
                  cache: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Unit-norm embedding of every distinct text, encoded once, in batches.

    ``cache`` (text -> vector) is read and extended, so texts shared by several split
    files are encoded once per run.  Texts are batched by length to waste little padding.
    """
    cache = {} if cache is None else cache
    todo = sorted(set(texts) - set(cache), key=lambda t: (len(t), t))
    if todo:
        cache.update(zip(todo, encoder.encode(todo, batch_size=batch_size).numpy(), strict=True))
    return cache


def rank_dense(samples: list[dict], *, query: Query = sample_input, encoder: Any = None, batch_size: int = 64,
               cache: dict[str, np.ndarray] | None = None, **_: Any) -> Ranking:
    """Cosine similarity of the query embedding to each history item embedding."""
    if encoder is None:
        from data_process.dense import shared_encoder

        encoder = shared_encoder()
    texts = [query(s) for s in samples] + [item_text(h) for s in samples for h in s["history"]]
    vec = dense_vectors(texts, encoder, batch_size, cache)
    out = []
    for s in samples:
        if not s["history"]:
            out.append(([], []))
            continue
        docs = np.stack([vec[item_text(h)] for h in s["history"]])
        out.append(_finish(docs @ vec[query(s)]))
    return out


RANKERS: dict[str, Callable[..., Ranking]] = {"bm25": rank_bm25, "recency": rank_recency, "dense": rank_dense}


def rank_samples(samples: list[dict], ranker: str = "bm25", *, query: Query = sample_input,
                 **kw: Any) -> list[dict]:
    """Copies of ``samples`` with ``history`` re-sorted (most relevant first) and ``scores``."""
    rankings = choose("ranker", ranker, RANKERS)(samples, query=query, **kw)
    out = []
    for s, (order, scores) in zip(samples, rankings, strict=True):
        out.append({**s, "history": [s["history"][i] for i in order], "scores": scores})
    return out
