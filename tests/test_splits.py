"""Stage 01: seeded user selection, splits, sparsity, fast-changing clusters, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_process.artifact_io import read_json, read_jsonl
from data_process.splits import apply_history_rate, build_splits, cluster_users, select_users, split_validation
from tasks import get_task

from .conftest import FIXTURES, ROOT, SHARED_DATA, run_stage

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")


def run01(run_dir: Path, task: str, data_dir: Path, *flags: str) -> dict | None:
    return run_stage("select_users", ["--config", str(ROOT / "configs" / f"{task}.json"), "--run-dir", str(run_dir),
                              "--data-dir", str(data_dir), *flags])


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.jsonl"))}


def users(samples) -> set[str]:
    return {s["user_id"] for s in samples}


def test_fixture_selection_writes_the_four_splits_with_disjoint_users(tmp_path):
    manifest = run01(tmp_path, "lamp4", FIXTURES / "lamp4", "--num-users", "2", "--num-unseen", "1",
                     "--min-history", "2", "--min-train", "1", "--clusters", "false")
    data = tmp_path / "data"
    files = {name: read_jsonl(data / f"{name}.jsonl") for name in ("train", "seen_test", "unseen_test", "remain_train")}
    seen, unseen = set(manifest["seen_users"]), set(manifest["unseen_users"])
    assert len(seen) == 2 and len(unseen) == 1 and not seen & unseen
    assert users(files["train"]) == users(files["seen_test"]) == seen
    assert users(files["unseen_test"]) == unseen
    assert users(files["remain_train"]) == {"u1", "u2", "u3"} - seen
    assert manifest["counts"]["train"] == len(files["train"]) and manifest["skipped_records"] == 0
    assert (data / "manifest.json").exists()


def test_selection_honours_min_train_and_min_history():
    bench = get_task("lamp4").load(FIXTURES / "lamp4", include_history_samples=False)
    # Every fixture user has exactly one train question; u1's longest test history is 4 items.
    seen, unseen = select_users(bench, num_users=1, num_unseen=0, min_history=4, min_train=1, seed=0)
    assert seen == ["u1"]
    with pytest.raises(ValueError, match=r"only 0 of 3 users have >= 2 training samples"):
        select_users(bench, num_users=1, num_unseen=0, min_history=0, min_train=2, seed=0)
    with pytest.raises(ValueError, match="unseen users"):
        select_users(bench, num_users=3, num_unseen=1, min_history=0, min_train=1, seed=0)


@needs_shared
def test_history_rate_keeps_a_seeded_fraction_and_thins_histories():
    bench = get_task("lamp4").load(SHARED_DATA / "lamp4")
    seen_test = list(bench.test)
    kept, test, dropped = apply_history_rate(bench.train, seen_test, 0.25, seed=3)
    assert dropped == len(bench.train) - len(kept) > 0
    for user in users(bench.train):
        n = sum(s["user_id"] == user for s in bench.train)
        assert sum(s["user_id"] == user for s in kept) == max(1, round(0.25 * n))
    kept_ids = {s["id"] for s in kept}
    dropped_ids = {s["id"] for s in bench.train} - kept_ids
    for s in kept + test:
        assert not {h["id"] for h in s["history"]} & dropped_ids
    again, _, _ = apply_history_rate(bench.train, seen_test, 0.25, seed=3)
    assert again == kept
    with pytest.raises(ValueError, match="history-rate"):
        apply_history_rate(bench.train, seen_test, 0.0, seed=3)


def test_clusters_are_three_equal_groups_with_the_least_similar_last():
    sims = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.5, "e": 0.3, "f": 0.7}
    assert cluster_users(sims) == [["a", "f"], ["c", "d"], ["b", "e"]]


@needs_shared
def test_cluster_files_split_seen_test_by_similarity_to_own_history():
    bench = get_task("longlamp").load(SHARED_DATA / "longlamp")
    splits = build_splits(bench, num_users=24, num_unseen=8, min_history=5, min_train=2, seed=42, clusters=True)
    groups = [splits.files[f"seen_test_cluster{k}"] for k in range(3)]
    assert [len(users(g)) for g in groups] == [8, 8, 8]
    assert sorted(s["id"] for g in groups for s in g) == sorted(s["id"] for s in splits.files["seen_test"])
    sim = splits.user_similarity
    assert min(sim[u] for u in users(groups[0])) >= max(sim[u] for u in users(groups[1]))
    assert min(sim[u] for u in users(groups[1])) >= max(sim[u] for u in users(groups[2]))
    assert all(0 <= v <= 1 for v in sim.values())


@needs_shared
@pytest.mark.parametrize("task", ["lamp4", "longlamp"])
def test_same_seed_gives_byte_identical_files_and_another_seed_other_users(tmp_path, task):
    first = run01(tmp_path / "a", task, SHARED_DATA / task, "--history-rate", "0.5")
    run01(tmp_path / "b", task, SHARED_DATA / task, "--history-rate", "0.5")
    a, b = file_bytes(tmp_path / "a" / "data"), file_bytes(tmp_path / "b" / "data")
    assert a == b and "seen_test_cluster2.jsonl" in a
    other = run01(tmp_path / "c", task, SHARED_DATA / task, "--seed", "7")
    assert other["seen_users"] != first["seen_users"]
    assert len(first["seen_users"]) == 24 and len(first["unseen_users"]) == 8


def test_a_finished_stage_is_skipped_unless_overwrite(tmp_path, caplog):
    flags = ("--num-users", "1", "--num-unseen", "1", "--min-history", "1", "--min-train", "1")
    assert run01(tmp_path, "longlamp", FIXTURES / "longlamp", *flags) is not None
    assert run01(tmp_path, "longlamp", FIXTURES / "longlamp", *flags) is None
    assert "already finished" in caplog.text
    assert run01(tmp_path, "longlamp", FIXTURES / "longlamp", *flags, "--overwrite") is not None


def test_bad_input_stops_before_anything_is_written(tmp_path):
    data = Path(shutil.copytree(FIXTURES / "lamp4", tmp_path / "raw"))
    qs = json.loads((data / "dev_questions.json").read_text())
    qs[0]["profile"] = []
    (data / "dev_questions.json").write_text(json.dumps(qs))
    with pytest.raises(ValueError, match="u1-d1"):
        run01(tmp_path / "run", "lamp4", data, "--num-users", "1", "--num-unseen", "1", "--min-history", "1",
              "--min-train", "1")
    assert not (tmp_path / "run").exists()


def test_skip_mode_counts_skipped_records_in_the_manifest(tmp_path):
    data = Path(shutil.copytree(FIXTURES / "lamp4", tmp_path / "raw"))
    qs = json.loads((data / "dev_questions.json").read_text())
    qs[3]["input"] = ["not", "text"]
    (data / "dev_questions.json").write_text(json.dumps(qs))
    run01(tmp_path / "run", "lamp4", data, "--num-users", "1", "--num-unseen", "1", "--min-history", "1",
          "--min-train", "1", "--on-error", "skip")
    manifest = read_json(tmp_path / "run" / "data" / "manifest.json")
    assert manifest["skipped_records"] == 1 and "field 'input' must be str" in manifest["errors"][0]


def test_dense_similarity_puts_users_whose_tests_resemble_their_history_first():
    from data_process.splits import user_similarity

    class Axes:  # "cat" and "dog" axes: enough to tell the two users apart
        def encode(self, texts, batch_size=64):
            import torch
            rows = [[t.count("cat") + 0.01, t.count("dog") + 0.01] for t in texts]
            return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)

    def sample(user, text, history):
        return {"id": f"{user}-{text}", "user_id": user, "input": text, "output": "",
                "history": [{"id": h, "input": h, "output": ""} for h in history]}

    tests = [sample("cats", "cat", ["cat", "cat"]), sample("mixed", "cat", ["dog", "cat"]),
             sample("dogs", "cat", ["dog", "dog"])]
    sim = user_similarity(tests, "dense", encoder=Axes())
    assert sim["cats"] > sim["mixed"] > sim["dogs"]
    assert cluster_users(sim) == [["cats"], ["mixed"], ["dogs"]]


def test_validation_holds_out_each_users_latest_question_everywhere_in_train():
    train = [
        {"id": "h1", "user_id": "a", "input": "i", "output": "old item", "history": [], "source": "history"},
        {"id": "q1", "user_id": "a", "input": "i", "output": "first", "history": [], "source": "question"},
        {"id": "q2", "user_id": "a", "input": "i", "output": "latest", "history": [], "source": "question"},
        # A promoted copy of the held-out answer (other id, same text) and a history
        # item carrying it must leave train too.
        {"id": "h2", "user_id": "a", "input": "i", "output": "latest", "history": [], "source": "history"},
        {"id": "h3", "user_id": "a", "input": "i", "output": "later", "source": "history",
         "history": [{"id": "q2", "input": "i", "output": "latest"}, {"id": "h1", "input": "i", "output": "old item"}]},
        {"id": "b1", "user_id": "b", "input": "i", "output": "latest", "history": [], "source": "question"},
    ]
    kept, val = split_validation(train, 1)
    assert [s["id"] for s in val] == ["q2", "b1"]
    assert [s["id"] for s in kept] == ["h1", "q1", "h3"]
    assert [h["id"] for h in kept[2]["history"]] == ["h1"]
    kept2, val2 = split_validation(train, 2)
    assert [s["id"] for s in val2] == ["q1", "q2", "b1"] and "q1" not in {s["id"] for s in kept2}
    assert split_validation(train, 0) == (train, [])
    with pytest.raises(ValueError, match="--val-questions"):
        split_validation(train, -1)


@needs_shared
def test_seen_val_on_real_data_is_disjoint_from_train_and_kept_in_test_histories(tmp_path):
    run01(tmp_path, "lamp4", SHARED_DATA / "lamp4", "--clusters", "false")
    data = {p.stem: read_jsonl(p) for p in (tmp_path / "data").glob("*.jsonl")}
    val, train = data["seen_val"], data["train"]
    assert len(val) == 24 and users(val) == users(data["seen_test"])
    held = {(s["user_id"], s["output"]) for s in val} | {(s["user_id"], s["id"]) for s in val}
    for s in train:
        assert (s["user_id"], s["output"]) not in held and (s["user_id"], s["id"]) not in held
        assert not any((s["user_id"], h["id"]) in held or (s["user_id"], h["output"]) in held for h in s["history"])
    in_test_history = {(s["user_id"], h["id"]) for s in data["seen_test"] for h in s["history"]}
    assert any((s["user_id"], s["id"]) in in_test_history for s in val)
