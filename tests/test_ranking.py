"""Stage 02: history ranking (bm25 | recency | dense), determinism, resume, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data_process.artifact_io import read_json, read_jsonl
from data_process.ranking import rank_samples
from tasks import get_task

from .conftest import FIXTURES, ROOT, SHARED_DATA, run_stage

ENCODER = ROOT / "models" / "all-minilm-l6-v2"

HISTORY = [
    {"id": "h0", "input": "dogs bark loudly", "output": "dog news"},
    {"id": "h1", "input": "a cat sat on the mat", "output": "cat on mat"},
    {"id": "h2", "input": "the cat slept", "output": "sleepy cat"},
    {"id": "h3", "input": "dogs bark loudly", "output": "dog news"},
    {"id": "h4", "input": "stocks fell", "output": "markets"},
]
SAMPLE = {"id": "q", "user_id": "u", "input": "Generate a headline for the following article: Cat on the mat!",
          "output": "gold", "history": HISTORY}


def hand_bm25(tf: dict[str, int], dl: int) -> float:
    """BM25Okapi (k1=1.5, b=0.75) for the query cat/on/the/mat over HISTORY (N=5, avgdl=27/5)."""
    in_one, in_two = math.log(4.5 / 1.5), math.log(3.5 / 2.5)  # terms in 1 and in 2 of the 5 items
    idf = {"cat": in_two, "the": in_two, "on": in_one, "mat": in_one}
    norm = 1.5 * (0.25 + 0.75 * dl / 5.4)
    return sum(idf[t] * n * 2.5 / (n + norm) for t, n in tf.items())


def test_the_query_is_the_task_text_without_its_instruction():
    assert get_task("lamp4").query(SAMPLE) == "Cat on the mat!"
    assert get_task("longlamp").query({"input": 'Generate an abstract for the title "Steering".'}) == "Steering"
    assert get_task("pwab").query({"input": "find red shoes"}) == "find red shoes"


def test_bm25_ranks_the_hand_checked_example_and_keeps_time_order_on_ties():
    (ranked,) = rank_samples([SAMPLE], "bm25", query=get_task("lamp4").query)
    assert [h["id"] for h in ranked["history"]] == ["h1", "h2", "h0", "h3", "h4"]
    expected_h1 = hand_bm25({"cat": 2, "on": 2, "the": 1, "mat": 2}, dl=9)
    expected_h2 = hand_bm25({"cat": 2, "the": 1}, dl=5)
    assert ranked["scores"] == pytest.approx([expected_h1, expected_h2, 0, 0, 0], abs=1e-5)
    assert SAMPLE["history"][0]["id"] == "h0"  # the input sample is left untouched


def test_recency_puts_the_newest_item_first():
    (ranked,) = rank_samples([SAMPLE], "recency")
    assert [h["id"] for h in ranked["history"]] == ["h4", "h3", "h2", "h1", "h0"]
    assert ranked["scores"] == [1.0, 0.8, 0.6, 0.4, 0.2]


class KeywordEncoder:
    """A stand-in encoder: one axis per keyword; records what it was asked to encode."""

    def __init__(self):
        self.calls: list[tuple[list[str], int]] = []

    def encode(self, texts, batch_size=64):
        self.calls.append((list(texts), batch_size))
        rows = [[t.lower().count("cat"), t.lower().count("dog"), t.lower().count("mat"), 0.1] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_dense_ranks_by_cosine_and_encodes_each_distinct_text_once():
    encoder = KeywordEncoder()
    (ranked,) = rank_samples([SAMPLE], "dense", query=get_task("lamp4").query, encoder=encoder, batch_size=8)
    assert [h["id"] for h in ranked["history"]] == ["h1", "h2", "h4", "h0", "h3"]
    assert ranked["scores"] == sorted(ranked["scores"], reverse=True)
    (texts, batch_size), = encoder.calls
    assert batch_size == 8 and len(texts) == len(set(texts)) == 5  # h0 and h3 share one text


@pytest.mark.skipif(not (ENCODER / "config.json").exists(), reason="models/ not built")
def test_dense_with_minilm_puts_the_cat_items_first():
    from data_process.dense import DenseEncoder

    (ranked,) = rank_samples([SAMPLE], "dense", query=get_task("lamp4").query, encoder=DenseEncoder(ENCODER),
                             batch_size=2)
    assert {h["id"] for h in ranked["history"][:2]} == {"h1", "h2"}


def test_unknown_ranker_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'bm25'"):
        rank_samples([SAMPLE], "bm26")


# --- the stage ---------------------------------------------------------------------------

def run_both(run_dir: Path, task: str, data_dir: Path, *rank_flags: str, select_flags=()) -> dict | None:
    config = str(ROOT / "configs" / f"{task}.json")
    run_stage("select_users",
              ["--config", config, "--run-dir", str(run_dir), "--data-dir", str(data_dir), *select_flags])
    return run_stage("rank_history", ["--config", config, "--run-dir", str(run_dir), *rank_flags])


def ranked_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "ranked").glob("*.jsonl"))}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
@pytest.mark.parametrize("task", ["lamp4", "longlamp"])
def test_stages_01_and_02_on_shared_data_rank_every_history_reproducibly(tmp_path, task):
    manifest = run_both(tmp_path / "a", task, SHARED_DATA / task)
    data, ranked = tmp_path / "a" / "data", tmp_path / "a" / "ranked"
    names = sorted(p.name for p in data.glob("*.jsonl"))
    assert names == sorted(p.name for p in ranked.glob("*.jsonl")) and len(names) == 8  # 4 splits, seen_val, 3 clusters
    for name in names:
        before, after = read_jsonl(data / name), read_jsonl(ranked / name)
        assert [s["id"] for s in before] == [s["id"] for s in after]
        for b, a in zip(before, after, strict=True):
            assert sorted(h["id"] for h in a["history"]) == sorted(h["id"] for h in b["history"])
            assert len(a["scores"]) == len(a["history"]) and a["scores"] == sorted(a["scores"], reverse=True)
    assert manifest["counts"]["seen_test.jsonl"] == 48
    run_both(tmp_path / "b", task, SHARED_DATA / task)
    assert ranked_bytes(tmp_path / "a") == ranked_bytes(tmp_path / "b")


SMALL = ("--num-users", "2", "--num-unseen", "1", "--min-history", "1", "--min-train", "1")


def test_an_interrupted_ranking_resumes_to_the_same_files(tmp_path):
    # History samples on, so train holds more than the two records this test keeps.
    run_both(tmp_path, "longlamp", FIXTURES / "longlamp", select_flags=(*SMALL, "--include-history-samples", "true"))
    full = ranked_bytes(tmp_path)
    train = tmp_path / "ranked" / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[:2]) + lines[2][:10])  # two records and a torn third
    (tmp_path / "ranked" / "manifest.json").unlink()
    (tmp_path / "ranked" / "seen_test.jsonl").unlink()
    run_stage("rank_history", ["--config", str(ROOT / "configs" / "longlamp.json"), "--run-dir", str(tmp_path)])
    assert ranked_bytes(tmp_path) == full


def test_ranking_needs_the_select_stage_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="run scripts.01_select_users first"):
        run_stage("rank_history", ["--config", str(ROOT / "configs" / "lamp4.json"), "--run-dir", str(tmp_path)])


def test_a_bad_record_in_a_split_file_names_file_line_and_field(tmp_path):
    run_stage("select_users", ["--config", str(ROOT / "configs" / "lamp4.json"), "--run-dir", str(tmp_path),
                       "--data-dir", str(FIXTURES / "lamp4"), *SMALL])
    path = tmp_path / "data" / "train.jsonl"
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["history"] = "not a list"
    path.write_text("\n".join([lines[0], json.dumps(rec), *lines[2:]]) + "\n")
    argv = ["--config", str(ROOT / "configs" / "lamp4.json"), "--run-dir", str(tmp_path)]
    with pytest.raises(ValueError, match=rf"train.jsonl:2: record '{rec['id']}': field 'history' must be list"):
        run_stage("rank_history", argv)
    assert not (tmp_path / "ranked").exists()
    manifest = run_stage("rank_history", argv + ["--on-error", "skip"])
    assert manifest["skipped_records"] == 1
    assert rec["id"] not in {r["id"] for r in read_jsonl(tmp_path / "ranked" / "train.jsonl")}
    assert read_json(tmp_path / "ranked" / "manifest.json")["counts"]["train.jsonl"] == len(lines) - 1


def test_duplicate_ids_in_a_split_file_are_rejected(tmp_path):
    run_stage("select_users", ["--config", str(ROOT / "configs" / "lamp4.json"), "--run-dir", str(tmp_path),
                       "--data-dir", str(FIXTURES / "lamp4"), *SMALL])
    path = tmp_path / "data" / "seen_test.jsonl"
    first = path.read_text().splitlines()[0]
    with open(path, "a") as f:
        f.write(first + "\n")
    with pytest.raises(ValueError, match=r"seen_test.jsonl:\d+: record '[^']+': duplicate id"):
        run_stage("rank_history", ["--config", str(ROOT / "configs" / "lamp4.json"), "--run-dir", str(tmp_path)])
