"""The shared sparse BM25 and the stable top-K of pair retrieval."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from rank_bm25 import BM25Okapi

from data_process.text import BM25, tokenize
from steering.aggregate import top_k


def test_the_negative_idf_floor_and_repeated_query_terms_match_the_hand_computation():
    # "a" is in 3 of 4 documents: idf log(1.5/3.5) < 0 is replaced by 0.25 x the mean idf
    # over the 6 terms, (4 log(7/3)) / 6 / 4 = log(7/3) / 6.  Every document has length 2
    # = avgdl, so tf 1 scores idf x 2.5 / 2.5.  A query term counts as often as it occurs.
    bm25 = BM25(["a b", "a c", "a d", "e f"])
    assert bm25.scores("a") == pytest.approx([math.log(7 / 3) / 6] * 3 + [0.0], abs=1e-12)
    assert bm25.scores("A, a!") == pytest.approx(2 * bm25.scores("a"), abs=1e-12)
    assert bm25.scores("b unknown") == pytest.approx([math.log(3.5 / 1.5), 0, 0, 0], abs=1e-12)


def test_scores_equal_rank_bm25_on_random_corpora_and_batches_equal_single_queries():
    rng = random.Random(0)  # rank_bm25 is the independent reference: scores must be bit-identical
    words = [f"w{i}" for i in range(200)] + ["the"] * 60  # "the" is in most documents
    for _ in range(300):
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 25))) for _ in range(rng.randint(1, 40))]
        queries = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) for _ in range(3)]
        tokens = [tokenize(d) for d in docs]
        if not any(tokens):
            continue
        reference = BM25Okapi(tokens)
        bm25 = BM25(docs)
        batch = bm25.batch_scores(queries)
        for query, row in zip(queries, batch, strict=True):
            expected = reference.get_scores(tokenize(query))
            np.testing.assert_array_equal(row, expected)  # to the last bit: near-ties rank alike
            np.testing.assert_array_equal(bm25.scores(query), row)


def test_empty_corpora_and_blank_documents_answer_with_zeros():
    assert BM25([]).scores("x").shape == (0,)
    assert BM25(["", "  ..."]).scores("x").tolist() == [0.0, 0.0]
    assert BM25(["", "x y"]).batch_scores(["x", ""]).shape == (2, 2)
    assert BM25([["x"], ["y"], ["z"]]).scores("x").tolist() == BM25(["x", "y", "z"]).scores("x").tolist()


def test_a_saved_matrix_scores_like_the_original():
    bm25 = BM25(["red apple pie", "green apple", "blue car"])
    vocab = sorted(bm25.vocab, key=bm25.vocab.get)
    w = bm25.weights
    again = BM25.from_matrix(vocab, (w.data, w.indices, w.indptr), bm25.size)
    np.testing.assert_array_equal(again.scores("apple car car"), bm25.scores("apple car car"))


def test_top_k_breaks_ties_by_index_like_a_stable_sort():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 3, 5, 16):
        scores = torch.randint(0, 3, (50, 16), generator=gen).double()  # ties everywhere
        scores[0] = 0.0
        values, order = top_k(scores, k)
        expected_values, expected_order = torch.sort(scores, dim=1, descending=True, stable=True)
        assert torch.equal(order, expected_order[:, :k]) and torch.equal(values, expected_values[:, :k])
