"""Retrieval + aggregation of pair vectors into one vector per query."""

from __future__ import annotations

import logging

import pytest
import torch

from steering.aggregate import PairAggregator
from steering.vectors import VectorStore, save_vectors

U1 = ["red apple pie", "green apple tart", "blue car engine", "fast red car", "quiet forest walk",
      "ocean waves sound"]
U2 = ["red car", "red car again"]


def _store(field="prompt"):
    """Pair i's vector is the basis vector e_i, so an aggregate shows its weights directly.
    ``field`` says which index field holds the pair's text (``query`` in current stores)."""
    prompts = [("u1", p) for p in U1] + [("u2", p) for p in U2]
    index = [{"pair_id": f"p{i}", "user_id": u, "sample_id": f"s{i}", "prompt": f"Write about: {p}"}
             for i, (u, p) in enumerate(prompts)]
    if field == "query":
        index = [{**r, "query": p} for r, (_, p) in zip(index, prompts, strict=True)]
    else:
        index = [{**r, "prompt": p} for r, (_, p) in zip(index, prompts, strict=True)]
    eye = torch.eye(len(index))
    return VectorStore({"keys": ["attn.1", "mlp.1"]}, index, {"attn.1": eye, "mlp.1": 2 * eye})


def test_softmax_weights_sum_to_one_and_pick_the_hand_checked_top_k():
    agg = PairAggregator(_store(), ["attn.1", "mlp.1"], top_pairs=3, softmax_temperature=0.5)
    rows, weights = agg.select("u1", ["red car"])
    # "fast red car" holds both words; "red apple pie" and "blue car engine" one each with
    # equal length, so they tie and keep index order; nothing else matches.
    assert rows.tolist() == [[3, 0, 2]]
    torch.testing.assert_close(weights.sum(1), torch.ones(1))
    assert weights[0, 0] > weights[0, 1] and torch.isclose(weights[0, 1], weights[0, 2])
    out = agg.vectors(["u1"], ["red car"])
    assert torch.allclose(out["attn.1"][0, [3, 0, 2]], weights[0])
    assert out["attn.1"][0, [1, 4, 5, 6, 7]].abs().sum() == 0  # not retrieved / other user's pairs
    torch.testing.assert_close(out["mlp.1"], 2 * out["attn.1"])


def test_softmax_weights_follow_score_over_temperature():
    agg = PairAggregator(_store(), ["attn.1"], top_pairs=2, softmax_temperature=0.1)
    hot = PairAggregator(_store(), ["attn.1"], top_pairs=2, softmax_temperature=100.0)
    scores = agg._scores(agg._user("u1"), ["red car"])[0]
    expected = torch.softmax(scores[[3, 0]] / 0.1, 0).float()
    torch.testing.assert_close(agg.select("u1", ["red car"])[1][0], expected)
    assert hot.select("u1", ["red car"])[1][0, 1] > expected[1]  # higher T -> flatter weights


def test_mean_weighting_averages_the_top_k_equally():
    agg = PairAggregator(_store(), ["attn.1"], top_pairs=2, pair_weighting="mean")
    out = agg.vectors(["u1"], ["engine"])
    assert out["attn.1"][0, 2] == 0.5 and out["attn.1"][0].sum() == pytest.approx(1.0)


def test_a_batch_of_mixed_users_equals_each_query_alone_and_missing_users_get_zeros(caplog):
    agg = PairAggregator(_store(), ["attn.1"], top_pairs=2)
    users = ["u1", "u2", "nobody", "u1"]
    queries = ["red car", "again", "red car", "forest ocean"]
    with caplog.at_level(logging.WARNING):
        batch = agg.vectors(users, queries)["attn.1"]
    for i, (u, q) in enumerate(zip(users, queries, strict=True)):
        torch.testing.assert_close(batch[i], agg.vectors([u], [q])["attn.1"][0])
    assert batch[2].abs().sum() == 0 and agg.missing_users == {"nobody"}
    assert "nobody" in caplog.text
    assert batch[1, 6:].sum() == pytest.approx(1.0) and batch[1, :6].sum() == 0  # u2's own pairs only
    assert len(agg._cache) == 2  # one retrieval index per user, built once


def test_a_user_with_fewer_pairs_than_k_uses_all_of_them():
    out = PairAggregator(_store(), ["attn.1"], top_pairs=10, pair_weighting="mean").vectors(["u2"], ["x"])
    torch.testing.assert_close(out["attn.1"][0, 6:], torch.tensor([0.5, 0.5]))


class _KeywordEncoder:
    """A stand-in dense encoder: one axis per keyword, unit norm."""

    words = ["apple", "car", "forest", "ocean"]

    def encode(self, texts):
        vecs = torch.tensor([[float(w in t) for w in self.words] for t in texts]) + 1e-3
        return torch.nn.functional.normalize(vecs, dim=-1)


def test_dense_retrieval_ranks_by_embedding_similarity():
    agg = PairAggregator(_store(), ["attn.1"], top_pairs=1, retriever="dense", encoder=_KeywordEncoder())
    rows, weights = agg.select("u1", ["a walk in the forest"])
    assert rows.tolist() == [[4]] and weights.tolist() == [[1.0]]


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="Did you mean 'softmax'"):
        PairAggregator(_store(), ["attn.1"], pair_weighting="softmx")
    with pytest.raises(ValueError, match="retriever"):
        PairAggregator(_store(), ["attn.1"], retriever="tfidf")
    with pytest.raises(ValueError, match="not loaded"):
        PairAggregator(_store(), ["block.1"])


def test_pairs_are_retrieved_by_their_query_field_and_old_stores_by_their_prompt(caplog):
    store = _store("query")
    store.index = [{**r, "prompt": "Write about: ocean waves sound"} for r in store.index]  # prompts all alike
    rows, _ = PairAggregator(store, ["attn.1"], top_pairs=1).select("u1", ["red car"])
    assert rows.tolist() == [[3]]
    with caplog.at_level(logging.WARNING):
        PairAggregator(_store(), ["attn.1"], top_pairs=1)
    assert "no 'query' field" in caplog.text


def _lazy_store(tmp_path, n_users=3, per_user=7, hidden=8):
    """A saved store whose users' pairs interleave (so a user's rows are not one run)."""
    index = [{"pair_id": f"p{i}", "user_id": f"u{i % n_users}", "sample_id": f"s{i}", "prompt": "",
              "query": " ".join(f"w{(i * 7 + j) % 11}" for j in range(1 + i % 4))}
             for i in range(n_users * per_user)]
    tensors = {"attn.1": torch.randn(len(index), hidden), "mlp.1": torch.randn(len(index), hidden)}
    save_vectors(tmp_path, tensors, index, {"model": "m", "hidden_size": hidden})
    return VectorStore.load(tmp_path), VectorStore({"keys": sorted(tensors)}, index,
                                                   {k: v.half() for k, v in tensors.items()})


def test_a_lazy_store_aggregates_like_an_in_memory_one_and_reads_one_user_at_a_time(tmp_path, monkeypatch):
    lazy, memory = _lazy_store(tmp_path)
    read = []
    real_read = VectorStore.read
    monkeypatch.setattr(VectorStore, "read", lambda self, key, rows: read.append(rows) or real_read(self, key, rows))
    users, queries = ["u0", "u2", "u0", "u1"], ["w1 w3", "w5", "w2 w2 w9", "w10 w0"]
    agg = PairAggregator(lazy, ["attn.1", "mlp.1"], top_pairs=3)
    got = agg.vectors(users[:2], queries[:2])
    assert read == [[0, 3, 6, 9, 12, 15, 18]] * 2 + [[2, 5, 8, 11, 14, 17, 20]] * 2  # u1 not read
    got = {k: torch.cat([v, agg.vectors(users[2:], queries[2:])[k]]) for k, v in got.items()}
    expected = PairAggregator(memory, ["attn.1", "mlp.1"], top_pairs=3).vectors(users, queries)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_the_user_cache_is_bounded_and_an_evicted_user_is_read_again(tmp_path):
    lazy, _ = _lazy_store(tmp_path)
    one_user = 2 * 7 * 8 * 2  # keys x pairs x hidden x fp16 bytes
    agg = PairAggregator(lazy, ["attn.1", "mlp.1"], top_pairs=2, cache_mb=1.5 * one_user / 2**20)
    first = agg.vectors(["u0"], ["w1"])["attn.1"]
    agg.vectors(["u1"], ["w1"])
    assert list(agg._cache) == ["u1"]  # u0 evicted: the bound holds one user
    torch.testing.assert_close(agg.vectors(["u0"], ["w1"])["attn.1"], first)
    assert list(agg._cache) == ["u0"]
