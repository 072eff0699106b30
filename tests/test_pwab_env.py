"""PersonalWAB tool environment: cached BM25 product search and the SASRec recommender."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
import torch

import eval.pwab_env as pwab_env
from data_process.config import parse_config
from data_process.text import BM25
from eval.pwab_env import PwabEnv, load_catalogue, product_text, search_index
from eval.pwab_tools import ToolCall
from eval.sasrec import SASRec, SASRecConfig, SASRecRecommender, load_sasrec, save_sasrec
from tasks.pwab_data import load_pwab, user_sequences
from tests.conftest import FIXTURES
from train.sasrec import train_sasrec

PWAB = FIXTURES / "pwab"


def _catalogue(tmp_path, titles):
    root = tmp_path / "data"
    root.mkdir()
    products = {f"P{i}": {"title": t, "parent_asin": f"P{i}"} for i, t in enumerate(titles)}
    (root / "all_products_part_1.json").write_text(json.dumps(products))
    return root


def test_search_ranks_by_bm25_as_computed_by_hand(tmp_path):
    # "yoga": df 2 of 5 documents, avgdl 2.6.  P0 (tf 1, length 2): 2.5 / (1 + 1.5 (0.25 + 0.75 * 2/2.6))
    # = 1.116 x idf;  P1 (tf 2, length 4): 5 / (2 + 1.5 (0.25 + 0.75 * 4/2.6)) = 1.218 x idf.
    root = _catalogue(tmp_path, ["yoga mat", "yoga mat yoga strap", "coffee grinder", "steel water bottle",
                                 "running shoes"])
    index = search_index(root, tmp_path / "cache")
    idf = np.log(3.5) - np.log(2.5)
    assert index.scores("yoga")[:2] == pytest.approx([1.1159 * idf, 1.2178 * idf], abs=1e-3)
    assert index.search("yoga") == ["P1", "P0"]          # only documents with the term come back
    assert index.search("water bottle")[0] == "P3"
    assert index.search("yoga strap coffee") == ["P1", "P2", "P0"]
    assert index.search("teapot") == []


def test_search_scores_equal_the_shared_bm25(tmp_path):
    catalogue = load_catalogue(PWAB)
    reference = BM25([product_text(p) for p in catalogue.values()])
    index = search_index(PWAB, tmp_path)
    for query in ["burr grinder for french press coffee", "wireless noise cancelling", "yoga yoga mat", "dog"]:
        assert np.allclose(index.scores(query), reference.scores(query))


def test_fixture_gold_queries_find_their_target_first(tmp_path):
    env = PwabEnv(PWAB, tmp_path)
    bench = load_pwab(PWAB)
    for s in bench.train + bench.test:
        if s["type"] == "search":
            results = env.run(ToolCall("search_product_by_query", json.loads(s["output"])["arguments"]))
            assert results[0] == s["target"]["product_info"]["parent_asin"] and len(results) <= 10
    assert env.search_product_by_query("burr grinder")[0] == "B0KITC0001"


def test_the_index_is_built_once_and_reused_from_disk(tmp_path, monkeypatch):
    first = search_index(PWAB, tmp_path)
    assert not first.from_cache and (tmp_path / "search_index" / "index.npz").exists()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("index rebuilt although the cache is valid")

    monkeypatch.setattr(pwab_env.SearchIndex, "build", no_rebuild)
    again = search_index(PWAB, tmp_path)
    assert again.from_cache and again.search("coffee") == first.search("coffee")


def test_a_changed_catalogue_rebuilds_the_index(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(PWAB, root)
    assert search_index(root, tmp_path / "cache").search("teapot") == []
    products = json.loads((root / "all_products_part_1.json").read_text())
    products["B0NEW"] = {"title": "Glass teapot", "parent_asin": "B0NEW"}
    (root / "all_products_part_1.json").write_text(json.dumps(products))
    rebuilt = search_index(root, tmp_path / "cache")
    assert not rebuilt.from_cache and rebuilt.search("teapot") == ["B0NEW"]


def test_review_tool_returns_the_text(tmp_path):
    assert PwabEnv(PWAB, tmp_path).run(ToolCall("add_product_review", {"review": "Nice."})) == "Nice."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run far faster on one thread, above all on a loaded machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    start = time.perf_counter()
    model, items, losses = train_sasrec(list(user_sequences(PWAB).values()), epochs=30, seed=0,
                                        hidden=16, blocks=1, heads=1, max_len=10, dropout=0.0, lr=5e-3)
    return model, items, losses, time.perf_counter() - start


def test_sasrec_loss_falls_on_the_fixture(trained):
    _, items, losses, seconds = trained
    assert len(items) == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert seconds < 20


def test_sasrec_training_is_seeded():
    seqs = list(user_sequences(PWAB).values())
    runs = [train_sasrec(seqs, epochs=2, seed=3, hidden=8, blocks=1, heads=1, max_len=8)[2] for _ in range(2)]
    assert runs[0] == runs[1]


def test_sasrec_checkpoint_round_trips_and_recommends(trained, tmp_path):
    model, items, _, _ = trained
    save_sasrec(model, items, tmp_path / "sasrec", losses=[1.0])
    rec = SASRecRecommender(tmp_path / "sasrec")
    history = ["B0KITC0002", "B0BOOK0004", "B0KITC0003"]
    top = rec.recommend(history, 10)
    assert len(top) == 10 and len(set(top)) == 10 and set(top) <= set(items)
    with torch.no_grad():
        ids = [items.index(a) + 1 for a in history]
        expected = model.item_scores(torch.tensor([[0] * 7 + ids]))[0].topk(10).indices.tolist()
    assert top == [items[i] for i in expected]
    assert rec.recommend(["UNKNOWN"]) == [] and rec.recommend([]) == []
    env = PwabEnv(PWAB, tmp_path, sasrec_dir=tmp_path / "sasrec")
    assert env.run(ToolCall("get_recommendations_by_history", {"product_sequence": history})) == top


def test_a_missing_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.train_sasrec"):
        PwabEnv(PWAB, tmp_path).get_recommendations_by_history(["B0KITC0002"])
    save_sasrec(SASRec(SASRecConfig(num_items=3, hidden=8, heads=1, blocks=1)), ["a", "b", "c"], tmp_path / "x")
    cfg = json.loads((tmp_path / "x" / "config.json").read_text())
    cfg["config"]["hidden"] = 16
    (tmp_path / "x" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        load_sasrec(tmp_path / "x")


def test_train_sasrec_stage_writes_a_loadable_checkpoint(tmp_path, caplog):
    from stages.train_sasrec import TrainSasrecConfig, run

    caplog.set_level(logging.INFO)
    # the config's data_dir (data/pwab_synth) is written by setup.sh: run on the 30-product fixture
    argv = ["--config", "configs/pwab.json", "--run-dir", str(tmp_path), "--data-dir", str(PWAB), "--epochs", "3",
            "--hidden", "8", "--heads", "1", "--blocks", "1", "--max-len", "8"]
    manifest = run(parse_config(TrainSasrecConfig, argv))
    assert manifest["stage"] == "train_sasrec"
    assert len(manifest["losses"]) == 3 and manifest["items"] == 30
    model, items = load_sasrec(tmp_path / "pwab_env" / "sasrec")
    assert model.cfg.hidden == 8 and len(items) == 30
    assert "trained in" in caplog.text
    assert run(parse_config(TrainSasrecConfig, argv)) == {}  # finished: not trained again


def test_train_sasrec_refuses_a_task_without_a_recommender(tmp_path):
    from stages.train_sasrec import TrainSasrecConfig, run

    cfg = parse_config(TrainSasrecConfig, ["--task", "lamp4", "--run-dir", str(tmp_path), "--data-dir", str(PWAB)])
    with pytest.raises(ValueError, match="train_sasrec builds PersonalWAB's recommender; task 'lamp4'"):
        run(cfg)
    assert not (tmp_path / "pwab_env").exists()
