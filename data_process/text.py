"""Text helpers shared by every layer: THE tokenizer and BM25 used for every lexical
ranking in Fints (history ranking, pair retrieval, user clustering, product search), and
the one JSON scanner that finds objects in generated text.

Tokenizer: lowercase, then split on anything that is not a letter or digit
(punctuation and whitespace separate tokens; ``"Don't-stop!"`` -> ``["don", "t", "stop"]``).

BM25: the BM25Okapi of ``rank_bm25`` (k1=1.5, b=0.75; a negative idf is replaced by
0.25 x the mean idf; a query term counted as often as it occurs), precomputed once per
corpus as a sparse term x document weight matrix (scipy CSR), so scoring a batch of
queries is one sparse product instead of a Python loop over documents per query token.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import sparse

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_JSON_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)

K1, B, EPSILON = 1.5, 0.75, 0.25


def tokenize(text: str) -> list[str]:
    """Lowercase and split on punctuation/whitespace."""
    return _WORD.findall(text.lower())


class BM25:
    """BM25Okapi over a fixed list of documents, built once, queried many times.

    ``weights`` is the ``[terms, documents]`` CSR matrix of per-term BM25 weights
    ``idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))``; a query's scores are its
    term counts times that matrix.  Documents are strings or already-tokenized lists.
    An empty corpus or an all-empty document list still answers (with zeros), so a user
    with one blank history item never crashes a stage.
    """

    def __init__(self, documents: Sequence[str] | Sequence[list[str]], k1: float = K1, b: float = B,
                 epsilon: float = EPSILON):
        tokens = [tokenize(d) if isinstance(d, str) else d for d in documents]
        vocab: dict[str, int] = {}
        ids = [[vocab.setdefault(t, len(vocab)) for t in doc] for doc in tokens]
        self.vocab, self.size = vocab, len(tokens)
        self.weights = _bm25_weights(ids, len(vocab), k1, b, epsilon)

    @classmethod
    def from_matrix(cls, vocab: list[str], weights: sparse.csr_array | tuple[np.ndarray, ...], size: int) -> BM25:
        """A BM25 from a saved vocabulary (the term of each row) and its weight matrix
        (a CSR array or its ``(data, indices, indptr)``) over ``size`` documents."""
        self = cls.__new__(cls)
        self.vocab, self.size = {t: i for i, t in enumerate(vocab)}, size
        self.weights = sparse.csr_array(weights, shape=(len(vocab), size))
        return self

    def query_counts(self, queries: Sequence[str]) -> sparse.csr_array:
        """``[len(queries), terms]`` sparse query matrix: one entry 1.0 per occurrence of a
        known term, in query order, so the product adds a document's term weights in the
        order rank_bm25 does (and a repeated query term counts again) -- equal scores to
        the last bit, hence equal rankings even among float near-ties."""
        indptr, indices = [0], []
        for query in queries:
            indices.extend(self.vocab[t] for t in tokenize(query) if t in self.vocab)
            indptr.append(len(indices))
        return sparse.csr_array((np.ones(len(indices)), np.array(indices, dtype=np.int64),
                                 np.array(indptr, dtype=np.int64)), shape=(len(queries), len(self.vocab)))

    def batch_scores(self, queries: Sequence[str]) -> np.ndarray:
        """``[len(queries), documents]`` BM25 scores (float64, corpus order)."""
        if not len(self.vocab):
            return np.zeros((len(queries), self.size))
        return (self.query_counts(queries) @ self.weights).toarray()

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query`` (float64, corpus order)."""
        return self.batch_scores([query])[0]

    def top_k(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and scores of the ``k`` best documents; ties keep corpus order."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:k]
        return order, scores[order]


def _bm25_weights(ids: list[list[int]], n_terms: int, k1: float, b: float, epsilon: float) -> sparse.csr_array:
    """The ``[terms, documents]`` BM25Okapi weight matrix of tokenized documents (term ids)."""
    n_docs = len(ids)
    lengths = np.array([len(doc) for doc in ids], dtype=np.float64)
    if not n_terms:
        return sparse.csr_array((n_terms, n_docs))
    doc_of = np.repeat(np.arange(n_docs), lengths.astype(np.int64))
    term_of = np.fromiter((t for doc in ids for t in doc), dtype=np.int64, count=int(lengths.sum()))
    # One (term, document) cell per distinct pair, with its count: sorted by term, then document.
    cells, tf = np.unique(term_of * n_docs + doc_of, return_counts=True)
    term, doc = np.divmod(cells, n_docs)
    df = np.bincount(term, minlength=n_terms).astype(np.float64)
    # math.log and a sequential sum, as rank_bm25 computes them (np.log may differ in the
    # last bit); one log per distinct document frequency.
    values, inverse = np.unique(df, return_inverse=True)
    idf = np.array([math.log(n_docs - f + 0.5) - math.log(f + 0.5) for f in values.tolist()])[inverse]
    idf[idf < 0] = epsilon * (np.cumsum(idf)[-1] / n_terms)  # rank_bm25's floor for terms in over half the documents
    norm = k1 * (1 - b + b * lengths / lengths.mean())
    data = idf[term] * (tf * (k1 + 1) / (tf + norm[doc]))  # rank_bm25's order of operations
    indptr = np.concatenate([[0], np.cumsum(np.bincount(term, minlength=n_terms))])
    return sparse.csr_array((data, doc, indptr), shape=(n_terms, n_docs))


def json_objects(text: str) -> Iterator[tuple[dict, str]]:
    """Every JSON object in ``text`` as ``(object, its source text)``: the contents of
    ```json fences first, then the whole text, each scanned left to right."""
    decoder = json.JSONDecoder()
    for candidate in [m.group(1) for m in _JSON_FENCE.finditer(text)] + [text]:
        for match in re.finditer(r"\{", candidate):
            try:
                obj, end = decoder.raw_decode(candidate, match.start())
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj, candidate[match.start():end]
