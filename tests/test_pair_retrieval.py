"""Same-type pair retrieval (steering/pair_retrieval.py, stages/pair_retrieval.py)."""

from __future__ import annotations

import pytest
import torch

from data_process.cli import main
from stages.generate import GenerateConfig
from stages.pair_retrieval import run
from steering.aggregate import PairAggregator
from steering.pair_retrieval import retrieved, same_type_share, share_table
from steering.vectors import VectorStore

PAIRS = [{"pair_id": f"p{i}", "user_id": user, "sample_id": f"s{i}", "prompt": q, "query": q, "type": kind}
         for i, (user, kind, q) in enumerate([
             ("u1", "search", "find me a burr grinder for coffee"),
             ("u1", "review", "write my review of the desk lamp"),
             ("u1", "search", "search for trail running shoes"),
             ("u1", "recommend", "what should I buy next"),
             ("u1", "review", "post a review of the running shoes"),
             ("u2", "review", "write a review of the kettle")])]
REQUESTS = [{"id": "r1", "user_id": "u1", "input": "search for a burr coffee grinder", "type": "search"},
            {"id": "r2", "user_id": "u1", "input": "post my review of the desk lamp", "type": "review"},
            {"id": "r3", "user_id": "u2", "input": "find running shoes", "type": "search"},
            {"id": "r4", "user_id": "u3", "input": "what should I buy next", "type": "recommend"}]


def query(sample):
    return sample["input"]


def test_pairs_are_retrieved_exactly_as_stage_05_retrieves_them():
    picked = retrieved(PAIRS, REQUESTS, query, top_pairs=2)
    store = VectorStore({"hidden_size": 4}, PAIRS, tensors={"attn.1": torch.zeros(len(PAIRS), 4)})
    stage05 = PairAggregator(store, ["attn.1"], top_pairs=2)
    for sample, pairs in zip(REQUESTS, picked, strict=True):
        rows = stage05.select(sample["user_id"], [query(sample)])
        assert [p["pair_id"] for p in pairs] == ([PAIRS[j]["pair_id"] for j in rows[0][0].tolist()] if rows else [])
    assert [p["pair_id"] for p in picked[0]] == ["p0", "p2"]  # the search request finds the search pairs
    assert picked[3] == []  # a user without pairs


def test_the_share_counts_retrieved_pairs_of_the_request_type_against_chance():
    picked = retrieved(PAIRS, REQUESTS, query, top_pairs=2)
    by_user = {}
    for p in PAIRS:
        by_user.setdefault(p["user_id"], []).append(p)
    rows = same_type_share(REQUESTS, picked, lambda p: p["type"], by_user)
    assert list(rows) == ["recommend", "review", "search", "all"]
    # r1: 2 of 2 search pairs; r3: u2's one pair is a review
    assert rows["search"] == {"requests": 2, "with_pairs": 2, "retrieved": 3, "same_type": 2, "share": 0.6667,
                              "chance": 0.2}
    assert rows["review"]["share"] == 1.0 and rows["review"]["chance"] == 0.4
    assert rows["recommend"] == {"requests": 1, "with_pairs": 0, "retrieved": 0, "same_type": 0, "share": None,
                                 "chance": None}
    assert rows["all"]["requests"] == 4 and rows["all"]["retrieved"] == 5
    table = share_table(rows)
    assert "| search | 2 | 2 | 3 | 2 | 0.67 | 0.20 |" in table and "| recommend | 1 | 0 | 0 | 0 | - | - |" in table


def test_missing_files_are_one_line_errors_with_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(GenerateConfig, run, ["--task", "pwab", "--run-dir", str(tmp_path), "--split", "seen_val"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pairs.jsonl: no such file; run scripts.03_collect_pairs first" in err
