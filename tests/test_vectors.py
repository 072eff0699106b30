"""Vector store (safetensors, metadata checks) and per-user global vectors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from steering.loading import model_name
from steering.user_vectors import logistic_vector, mean_vector, pca_vector, user_vectors
from steering.vectors import VectorStore, load_user_vectors, save_user_vectors, save_vectors

INDEX = [{"pair_id": f"p{i}", "user_id": f"u{i % 2}", "sample_id": f"s{i}", "prompt": f"question {i}",
          "chosen": "x", "rejected": "y"} for i in range(4)]


def _save(tmp_path, model, hidden=32):
    meta = {"model": model_name(model), "hidden_size": hidden, "layers": [0], "sites": ["attn", "mlp"],
            "settings": {}}
    tensors = {"attn.0": torch.randn(4, hidden), "mlp.0": torch.randn(4, hidden)}
    save_vectors(tmp_path, tensors, INDEX, meta)
    return tensors, meta


def test_store_round_trips_vectors_index_and_metadata_without_pickle(tiny_llama, tmp_path):
    model, _ = tiny_llama
    tensors, _ = _save(tmp_path, model)
    store = VectorStore.load(tmp_path, model=model, keys=["mlp.0"])
    assert store.index == [{k: r[k] for k in ("pair_id", "user_id", "sample_id", "prompt")} for r in INDEX]
    assert store.get("mlp.0").dtype == torch.float32
    torch.testing.assert_close(store.get("mlp.0"), tensors["mlp.0"].half().float())
    assert store.meta["keys"] == ["attn.0", "mlp.0"] and store.meta["n_pairs"] == 4
    assert store.rows_by_user() == {"u0": [0, 2], "u1": [1, 3]}
    with safe_open(str(tmp_path / "vectors.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["fints"])["hidden_size"] == 32


def test_store_refuses_another_model_a_wrong_hidden_size_or_a_missing_key(tiny_llama, tiny_qwen2, tmp_path):
    llama, _ = tiny_llama
    qwen, _ = tiny_qwen2
    _save(tmp_path / "a", llama)
    with pytest.raises(ValueError, match="extracted from model"):
        VectorStore.load(tmp_path / "a", model=qwen)
    with pytest.raises(ValueError, match=r"key\(s\) \['block.0'\] were not extracted"):
        VectorStore.load(tmp_path / "a", model=llama, keys=["attn.0", "block.0"])
    _save(tmp_path / "b", llama, hidden=16)
    with pytest.raises(ValueError, match="hidden size 16 but the model has 32"):
        VectorStore.load(tmp_path / "b", model=llama)
    with pytest.raises(FileNotFoundError, match="04_extract_vectors"):
        VectorStore.load(tmp_path / "missing")


def test_store_refuses_an_index_that_does_not_belong_to_the_vectors(tiny_llama, tmp_path):
    model, _ = tiny_llama
    _save(tmp_path, model)
    index = json.loads((tmp_path / "vectors.index.json").read_text())
    index[0]["user_id"] = "someone else"
    (tmp_path / "vectors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not belong"):
        VectorStore.load(tmp_path, model=model)


def test_user_vectors_round_trip_by_strategy_key_and_user(tiny_llama, tmp_path):
    model, _ = tiny_llama
    vecs = {"mean": {"attn.0": {"u/1": torch.ones(32), "u2": torch.zeros(32)}},
            "pca": {"attn.0": {"u/1": -torch.ones(32), "u2": torch.ones(32)}}}
    save_user_vectors(tmp_path, vecs, {"model": model_name(model), "hidden_size": 32})
    loaded = load_user_vectors(tmp_path, "pca", ["attn.0"], model=model)
    assert sorted(loaded) == ["u/1", "u2"]
    assert torch.equal(loaded["u/1"]["attn.0"], -torch.ones(32))
    with pytest.raises(ValueError, match="strategy 'logistic' not stored"):
        load_user_vectors(tmp_path, "logistic", ["attn.0"])
    with pytest.raises(ValueError, match="not extracted"):
        load_user_vectors(tmp_path, "mean", ["mlp.3"])


def _constructed(n=40, hidden=6, seed=0):
    """Positives and negatives share a random base; the difference has a small mean along
    e0 and a large, mostly positive spread along e1; the classes separate along e2."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, hidden, generator=gen)
    spread = 5.0 * torch.randn(n, generator=gen) + 1.0
    diff = torch.zeros(n, hidden)
    diff[:, 0] = 1.0
    diff[:, 1] = spread
    return diff, base + diff, base


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_mean_pca_and_logistic_user_vectors_point_the_expected_way():
    diff, pos, neg = _constructed()
    mean = mean_vector(diff, pos, neg)
    torch.testing.assert_close(mean, diff.mean(0))
    pca = pca_vector(diff, pos, neg)
    assert abs(_cos(pca, torch.eye(6)[1])) > 0.99      # the axis of largest spread ...
    assert _cos(pca, mean) > 0                        # ... signed like the mean
    assert torch.isclose(pca.norm(), mean.norm())     # ... with the mean's length
    flipped = pca_vector(-diff, neg, pos)
    assert _cos(flipped, -mean) > 0

    # Classes separated along e2 only: the classifier direction is +e2 (towards positives).
    gen = torch.Generator().manual_seed(1)
    neg = torch.randn(60, 6, generator=gen)
    pos = torch.randn(60, 6, generator=gen)
    pos[:, 2] += 3.0
    logistic = logistic_vector(pos - neg, pos, neg)
    assert _cos(logistic, torch.eye(6)[2]) > 0.9
    assert torch.isclose(logistic.norm(), (pos - neg).mean(0).norm())


def test_user_vectors_use_only_each_users_own_pairs():
    diff = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    acts = {"diff": {"attn.0": diff}, "pos": {"attn.0": diff}, "neg": {"attn.0": torch.zeros(4, 2)}}
    index = [{"user_id": u} for u in ("a", "a", "b", "b")]
    out = user_vectors(index, acts, ["mean", "pca"])
    torch.testing.assert_close(out["mean"]["attn.0"]["a"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(out["mean"]["attn.0"]["b"], torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(out["pca"]["attn.0"]["b"], torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="Did you mean 'pca'"):
        user_vectors(index, acts, ["pcaa"])


def test_centered_user_vectors_remove_what_every_users_pairs_share():
    shared = torch.tensor([5.0, 5.0, 0.0])
    diff = torch.stack([shared + torch.tensor([0.0, 0.0, 1.0])] * 2 + [shared - torch.tensor([0.0, 0.0, 1.0])] * 2)
    acts = {"diff": {"mlp.0": diff}, "pos": {"mlp.0": diff}, "neg": {"mlp.0": torch.zeros(4, 3)}}
    index = [{"user_id": u} for u in ("a", "a", "b", "b")]
    out = user_vectors(index, acts, ["mean", "centered"])
    torch.testing.assert_close(out["centered"]["mlp.0"]["a"], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(out["centered"]["mlp.0"]["b"], torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(out["mean"]["mlp.0"]["a"], shared + torch.tensor([0.0, 0.0, 1.0]))


def test_a_loaded_store_reads_only_the_rows_asked_for(tiny_llama, tmp_path, monkeypatch):
    model, _ = tiny_llama
    tensors, _ = _save(tmp_path, model)
    store = VectorStore.load(tmp_path, model=model, keys=["mlp.0"])
    assert store.tensors is None and store.keys == ["mlp.0"]  # nothing read at load time
    sliced = []
    real_open = safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_slice(self, key):
            part = self.inner.get_slice(key)

            class Rows:
                def __getitem__(_, rows):
                    sliced.append((key, rows.start, rows.stop))
                    return part[rows]
            return Rows()

    monkeypatch.setattr("steering.vectors.safe_open", Recording)
    rows = store.read("mlp.0", [0, 2, 3])
    assert rows.dtype == torch.float16
    torch.testing.assert_close(rows, tensors["mlp.0"].half()[[0, 2, 3]])
    assert sliced == [("mlp.0", 0, 1), ("mlp.0", 2, 4)]  # one slice per run of consecutive rows
    with pytest.raises(ValueError, match="not loaded"):
        store.read("attn.0", [0])
