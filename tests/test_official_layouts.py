"""Benchmark files as they are downloaded: official layouts, time order from dates, one
sample per real item, ids scoped per user, LongLaMP questions and queries.

The fixtures are written here, in every layout, from one small data set per benchmark
holding the hard cases: unsorted profiles, integer dates, a question repeated in a later
profile under another id, an id shared by two users, a co-authored test paper.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from data_process.ranking import rank_samples
from data_process.timeline import time_keys
from tasks import get_task
from tasks.pwab import build_pwab_prompt
from tasks.pwab_data import load_pwab

from .conftest import FIXTURES, SHARED_DATA, run_stage

ART = "Generate a headline for the following article: "


def item(id_, text, title, date=None):
    out = {"id": id_, "text": text, "title": title}
    return out if date is None else {**out, "date": date}


A1, A2, A3 = (item("a-p1", "Alpha one text.", "Alpha one", "2020-01-01"),
              item("a-p2", "Alpha two text.", "Alpha two", "2020-02-01"),
              item("a-p3", "Alpha three text.", "Alpha three", "2020-03-01"))
# a-q1 asked again in a later profile under the id a-x, on the same day as a-p5.
AX, A5 = (item("a-x", "Alpha question text.", "Alpha question", "2020-04-01"),
          item("a-p5", "Alpha five.", "Alpha five", "2020-04-01"))
B6, B7 = item("p6", "Beta six.", "Beta six", 2018), item("p7", "Beta seven.", "Beta seven", 2019)
C7 = item("p7", "Gamma seven.", "Gamma seven", 2019)  # LaMP profile ids need not be unique across users
LAMP = {
    "train": [("a-q1", "a", "Alpha question text.", "Alpha question", [A3, A1, A2]),   # unsorted
              ("b-q1", "b", "Beta question.", "Beta question", [B7, B6]),             # unsorted, int dates
              ("c-q1", "c", "Gamma question.", "Gamma question", [C7, item("c-p1", "Gamma one.", "Gamma one", 2020)])],
    "dev": [("a-d1", "a", "Alpha test text.", "Alpha test", [A1, A2, A3, AX, A5]),
            ("b-d1", "b", "Beta test.", "Beta test", [B6, B7, item("p9", "Beta nine.", "Beta nine", 2020)]),
            ("c-d1", "c", "Gamma test.", "Gamma test", [C7, item("c-p1", "Gamma one.", "Gamma one", 2020)])],
}


def write_lamp(root: Path, layout: str) -> Path:
    """LAMP in ``layout``: flat | official (train/, dev/) | valid (train/, valid/valid_*)."""
    for split, questions in LAMP.items():
        name = "valid" if (split == "dev" and layout == "valid") else split
        folder = root if layout == "flat" else root / name
        folder.mkdir(parents=True, exist_ok=True)
        qs = [{"id": q, "input": ART + text, "profile": profile, "user_id": user}
              for q, user, text, _, profile in questions]
        golds = {"task": "LaMP_4", "golds": [{"id": q, "output": gold} for q, _, _, gold, _ in questions]}
        (folder / f"{name}_questions.json").write_text(json.dumps(qs))
        (folder / f"{name}_outputs.json").write_text(json.dumps(golds))
    return root


def by_id(samples):
    return {s["id"]: s for s in samples}


def ids(samples):
    return [s["id"] for s in samples]


# --- LaMP layouts --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["official", "valid"])
def test_lamp_official_split_folders_load_like_the_flat_folder(tmp_path, layout):
    flat = get_task("lamp4").load(write_lamp(tmp_path / "flat", "flat"))
    got = get_task("lamp4").load(write_lamp(tmp_path / layout, layout))
    assert got.train == flat.train and got.test == flat.test
    assert got.layout.startswith("LaMP split folders train/ + " + ("dev/" if layout == "official" else "valid/"))
    assert flat.layout.startswith("LaMP flat files")


def test_lamp5_fixture_loads_from_the_official_layout(tmp_path):
    for split in ("train", "dev"):
        (tmp_path / split).mkdir()
        for kind in ("questions", "outputs"):
            shutil.copy(FIXTURES / "lamp5" / f"{split}_{kind}.json", tmp_path / split)
    flat = get_task("lamp5").load(FIXTURES / "lamp5")
    got = get_task("lamp5").load(tmp_path)
    assert got.train == flat.train and got.test == flat.test and "train/ + dev/" in got.layout


def test_a_folder_without_lamp_files_lists_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no LaMP files; looked for train_questions.json, train_outputs.json, "
                                                r"train/train_questions.json.*valid/valid_outputs.json"):
        get_task("lamp4").load(tmp_path)


# --- time order ------------------------------------------------------------------------------

def test_histories_are_sorted_by_string_and_integer_dates_and_keep_them(tmp_path):
    bench = get_task("lamp4").load(write_lamp(tmp_path, "official"))
    train, test = by_id(bench.train), by_id(bench.test)
    assert ids(train["a-q1"]["history"]) == ["a-p1", "a-p2", "a-p3"]
    assert [h["date"] for h in train["a-q1"]["history"]] == ["2020-01-01", "2020-02-01", "2020-03-01"]
    assert ids(train["b-q1"]["history"]) == ["p6", "b/p7"] and train["b-q1"]["history"][0]["date"] == 2018
    assert ids(test["b-d1"]["history"]) == ["p6", "b/p7", "p9"]
    assert bench.stats["profiles"] == 6 and bench.stats["unsorted_profiles"] == 2


def test_no_history_item_is_later_than_its_promoted_sample_and_same_date_items_are_not_seen(tmp_path):
    bench = get_task("lamp4").load(write_lamp(tmp_path, "official"))
    train = by_id(bench.train)
    assert ids(train["a-p3"]["history"]) == ["a-p1", "a-p2"]
    # a-p5 shares its date with the repeated question a-q1: neither sees the other.
    assert ids(train["a-p5"]["history"]) == ["a-p1", "a-p2", "a-p3"]
    for s in bench.train:
        if s["source"] == "history":
            keys = time_keys([s] + s["history"])
            assert all(k < keys[0] for k in keys[1:]), s["id"]
    assert ids([s for s in bench.train if s["user_id"] == "a"]) == ["a-p1", "a-p2", "a-p3", "a-q1", "a-p5"]


def test_recency_ranks_by_date_not_by_list_order():
    sample = {"id": "s", "user_id": "u", "input": "q", "output": "o",
              "history": [item("old", "t", "x", "2019-05-01"), item("new", "t", "y", "2021-01-01"),
                          item("mid", "t", "z", 2020), item("mid2", "t", "w", 2020)]}
    for h in sample["history"]:
        h["input"], h["output"] = h.pop("text"), h.pop("title")
    (ranked,) = rank_samples([sample], "recency")
    assert ids(ranked["history"]) == ["new", "mid", "mid2", "old"]
    assert ranked["scores"] == [1.0, 0.75, 0.75, 0.25]  # same date, same score


# --- one sample per real item, ids per user ---------------------------------------------------

def test_a_question_repeated_in_a_later_profile_is_one_training_sample(tmp_path):
    bench = get_task("lamp4").load(write_lamp(tmp_path, "official"))
    assert "a-x" not in ids(bench.train)
    assert [s["id"] for s in bench.train if s["output"] == "Alpha question"] == ["a-q1"]
    # The repeated item takes the question's id in the later profile.
    assert "a-q1" in ids(by_id(bench.test)["a-d1"]["history"]) and bench.stats["merged_duplicates"] == 1
    pairs = {(s["user_id"], s["input"], s["output"]) for s in bench.train}
    assert len(pairs) == len(bench.train)


def test_an_id_shared_by_two_users_is_kept_once_per_user(tmp_path):
    bench = get_task("lamp4").load(write_lamp(tmp_path, "official"))
    train = by_id(bench.train)
    assert train["b/p7"]["output"] == "Beta seven" and train["c/p7"]["output"] == "Gamma seven"
    assert bench.stats["shared_ids"] == 1 and len(set(ids(bench.train + bench.test))) == len(bench.train + bench.test)


# --- LongLaMP ----------------------------------------------------------------------------------

def paper(id_, title, abstract, year):
    return {"id": id_, "title": title, "abstract": abstract, "year": year}


def ask(title, items):
    return f'Generate an abstract for the title "{title}" using the following items: {items}'


P1 = paper("P1", "Deep maps", "Deep maps abstract.", 2017)  # co-authored: in Ann's and Bob's profiles
KERNEL = paper("K1", "Kernel trick", "Kernel abstract.", 2021)  # Ann's test paper, also in Bob's profile
LONG = {
    "train": [{"name": "Ann", "input": ask("Graph nets", "1. graphs 2. nets"), "output": "Graph nets abstract.",
               "profile": [paper("P2", "Sparse codes", "Sparse abstract.", 2019), P1]},
              {"name": "Bob", "input": ask("Bob paper", "1. bobs"), "output": "Bob abstract.",
               "profile": [paper("P4", "Bob old", "Bob old abstract.", 2016), P1]}],
    "test": [{"name": "Ann", "input": ask("Kernel trick", "1. kernels 2. tricks"), "output": "Kernel abstract.",
              "profile": [P1, paper("P2", "Sparse codes", "Sparse abstract.", 2019),
                          paper("P3", "Graph nets", "Graph nets abstract.", 2020),  # the train question again
                          paper("P5", "Solo", "Solo abstract.", 2020)]},
             {"name": "Bob", "input": ask("Bob new", "1. news"), "output": "Bob new abstract.",
              "profile": [paper("P4", "Bob old", "Bob old abstract.", 2016), P1, KERNEL]}],
}


def _table(records):
    import pyarrow as pa

    return pa.Table.from_pylist(records)


def write_longlamp(root: Path, layout: str) -> Path:
    """LONG in ``layout``: jsonl | shards | shards_dir | save_to_disk | cache."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    root.mkdir(parents=True)
    for split, records in LONG.items():
        parts = [records[:1], records[1:]]  # two shards a split
        for k, part in enumerate(parts):
            shard = f"{split}-{k:05d}-of-00002"
            if layout == "jsonl" and k == 0:
                (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            elif layout == "shards":
                pq.write_table(_table(part), root / f"{shard}.parquet")
            elif layout == "shards_dir":
                (root / split).mkdir(exist_ok=True)
                pq.write_table(_table(part), root / split / f"{shard}.parquet")
            elif layout in ("save_to_disk", "cache"):
                folder = root / split if layout == "save_to_disk" else root
                folder.mkdir(exist_ok=True)
                name = f"data-{k:05d}-of-00002.arrow" if layout == "save_to_disk" else f"long_la_mp-{shard}.arrow"
                table = _table(part)
                with ipc.new_stream(str(folder / name), table.schema) as writer:
                    writer.write_table(table)
    if layout == "shards_dir":  # the hub also has a val split; test wins
        (root / "val").mkdir()
        pq.write_table(_table(LONG["test"][:1]), root / "val" / "val-00000-of-00001.parquet")
    if layout == "save_to_disk":
        (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    return root


@pytest.mark.parametrize("layout", ["shards", "shards_dir", "save_to_disk", "cache"])
def test_longlamp_hub_shards_and_datasets_folders_load_like_jsonl(tmp_path, layout):
    pytest.importorskip("pyarrow")
    expected = get_task("longlamp").load(write_longlamp(tmp_path / "jsonl", "jsonl"))
    got = get_task("longlamp").load(write_longlamp(tmp_path / layout, layout))
    assert got.train == expected.train and got.test == expected.test
    kind = {"shards": "Hugging Face parquet shards", "shards_dir": "Hugging Face parquet shards",
            "save_to_disk": "datasets save_to_disk folder", "cache": "datasets cache files"}[layout]
    assert got.layout.startswith(f"LongLaMP {kind} (train: 2 file(s)") and "test: 2 file(s)" in got.layout


def test_longlamp_missing_test_split_lists_every_name_looked_for(tmp_path):
    root = write_longlamp(tmp_path / "d", "jsonl")
    (root / "test.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"test split \(test, dev or val\); looked for test.jsonl.*"
                                                r"test-\*.parquet.*val/\*.arrow"):
        get_task("longlamp").load(root)


def test_longlamp_co_authored_ids_are_scoped_and_test_golds_never_reach_a_test_prompt(tmp_path):
    bench = get_task("longlamp").load(write_longlamp(tmp_path / "d", "jsonl"))
    train = by_id(bench.train)
    assert {"Ann/P1", "Bob/P1"} <= set(train) and bench.stats["shared_ids"] == 1
    bob_test = next(s for s in bench.test if s["user_id"] == "Bob")
    assert "Kernel abstract." not in [h["output"] for h in bob_test["history"]]  # Ann's test gold
    golds = {s["output"] for s in bench.test}
    assert not any(h["output"] in golds for s in bench.test for h in s["history"])
    # A co-author's training data may keep the paper (their own history, per-user vectors) and
    # it is posed with the real question's input, items clause included.
    assert train["K1"]["user_id"] == "Bob" and train["K1"]["input"] == ask("Kernel trick", "1. kernels 2. tricks")
    ann = next(s for s in bench.test if s["user_id"] == "Ann")
    assert ids(ann["history"]) == ["Ann/P1", "P2", "train-0", "P5"] and ann["history"][0]["date"] == 2017
    assert bench.stats["merged_duplicates"] == 1 and bench.stats["unsorted_profiles"] == 1
    assert train["P5"]["history"] == [h for h in ann["history"] if h["id"] in ("Ann/P1", "P2")]


def test_longlamp_query_is_the_title_and_the_prompt_keeps_the_items():
    task = get_task("longlamp")
    sample = {"input": ask("Graph nets", "1. graphs 2. nets.")}
    assert task.query(sample) == "Graph nets"
    assert task.prompt(sample, []) == ('Generate an abstract for the title "Graph nets" using the following '
                                       "items: 1. graphs 2. nets.\nWrite only the abstract.")
    promoted = {"input": 'Generate an abstract for the title "Deep maps".'}
    assert task.query(promoted) == "Deep maps"


# --- stage 01 summary ------------------------------------------------------------------------

def test_stage_01_runs_on_official_layouts_and_reports_what_loading_did(tmp_path, caplog):
    data = write_lamp(tmp_path / "lamp", "official")
    argv = ["--task", "lamp4", "--run-dir", str(tmp_path / "run"), "--data-dir", str(data), "--num-users", "2",
            "--num-unseen", "1", "--min-history", "2", "--min-train", "2"]
    with caplog.at_level(logging.INFO):
        manifest = run_stage("select_users", argv)
    assert "layout: LaMP split folders train/ + dev/" in caplog.text
    assert ("profiles: 6, 2 not in time order (sorted by date); merged duplicates: 1; "
            "ids shared by several users: 1") in caplog.text
    assert manifest["loading"] == {"profiles": 6, "unsorted_profiles": 2, "merged_duplicates": 1, "shared_ids": 1}
    run_stage("rank_history", ["--task", "lamp4", "--run-dir", str(tmp_path / "run"), "--ranker", "recency"])
    ranked = [json.loads(line) for line in (tmp_path / "run" / "ranked" / "train.jsonl").read_text().splitlines()]
    assert ranked and all(s["scores"] == sorted(s["scores"], reverse=True) for s in ranked)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
def test_shared_debian_data_has_no_dates_duplicates_or_shared_ids():
    bench = get_task("lamp4").load(SHARED_DATA / "lamp4")
    assert bench.stats == {"profiles": 192, "unsorted_profiles": 0, "merged_duplicates": 0, "shared_ids": 0}


# --- PersonalWAB user profiles ---------------------------------------------------------------

def test_pwab_user_profiles_are_off_by_default_and_shown_in_the_prompt_when_asked(tmp_path):
    plain = load_pwab(FIXTURES / "pwab")
    assert "user_profile" not in plain.test[0] and "About the user" not in build_pwab_prompt(plain.test[0], [])
    assert plain.stats["users_with_user_profile"] == 6 and "user_profiles.json present, not used" in plain.layout
    told = load_pwab(FIXTURES / "pwab", user_profiles=True)
    assert told.test[0]["user_profile"]["Occupation"]
    assert f"Occupation: {told.test[0]['user_profile']['Occupation']}" in build_pwab_prompt(told.test[0], [])
    bare = Path(shutil.copytree(FIXTURES / "pwab", tmp_path / "pwab"))
    (bare / "user_profiles.json").unlink()
    with pytest.raises(FileNotFoundError, match="user_profiles.json: no such file"):
        load_pwab(bare, user_profiles=True)
