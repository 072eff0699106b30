"""Benchmark loaders: each raw format, the leakage rule, and one test per bad-input case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_process.records import Benchmark
from data_process.schema import validate_sample
from tasks import get_task, task_names

from .conftest import FIXTURES, SHARED_DATA


def ids(samples):
    return [s["id"] for s in samples]


def by_id(samples):
    return {s["id"]: s for s in samples}


def copy_fixture(tmp_path: Path, task: str) -> Path:
    return Path(shutil.copytree(FIXTURES / task, tmp_path / task))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def assert_no_leakage(bench: Benchmark) -> None:
    """No sample sees its own output, nor any of its user's test items or golds."""
    test_ids = {(s["user_id"], s["id"]) for s in bench.test}
    test_golds = {(s["user_id"], s["output"]) for s in bench.test}
    for s in bench.train + bench.test:
        for h in s["history"]:
            assert h["id"] != s["id"], s["id"]
            assert h["output"] != s["output"], s["id"]
            assert (s["user_id"], h["id"]) not in test_ids, (s["id"], h["id"])
            assert (s["user_id"], h["output"]) not in test_golds, (s["id"], h["id"])
    assert not set(ids(bench.train)) & set(ids(bench.test))


# --- formats -----------------------------------------------------------------------------

def test_registry_names_every_benchmark_and_suggests_close_names():
    assert set(task_names()) == {"lamp4", "lamp4_style", "lamp5", "longlamp", "pwab"}
    with pytest.raises(ValueError, match="Did you mean 'lamp4'"):
        get_task("lamp-4")


def test_lamp4_fixture_maps_article_to_history_input_and_title_to_output():
    bench = get_task("lamp4").load(FIXTURES / "lamp4")
    train, test = by_id(bench.train), by_id(bench.test)
    assert set(test) == {"u1-d1", "u1-d2", "u2-d1", "u3-d1"}
    t1 = train["u1-t1"]
    assert t1["user_id"] == "u1" and t1["output"] == "Cat food launched for picky cats"
    assert t1["history"][0] == {"id": "u1-a1", "input": "The city zoo welcomed a baby panda born this spring.",
                                "output": "Zoo welcomes baby panda"}
    for s in bench.train + bench.test:
        validate_sample(s, "lamp4")
    assert bench.errors == []


def test_lamp4_history_items_become_training_samples_with_the_headline_instruction():
    bench = get_task("lamp4").load(FIXTURES / "lamp4", include_history_samples=True)
    a3 = by_id(bench.train)["u1-a3"]
    assert a3["input"] == ("Generate a headline for the following article: "
                           "The panda at the city zoo ate bamboo in front of crowds.")
    assert a3["output"] == "Panda eats bamboo at zoo"
    # Only the items before it in the user's time order.
    assert ids(a3["history"]) == ["u1-a1", "u1-a2", "u1-t1"]
    assert ids([s for s in bench.train if s["user_id"] == "u1"]) == ["u1-a1", "u1-a2", "u1-t1", "u1-a3"]
    only_questions = get_task("lamp4").load(FIXTURES / "lamp4", include_history_samples=False)
    assert ids(only_questions.train) == ["u1-t1", "u2-t1", "u3-t1"]


def test_longlamp_jsonl_fixture_uses_name_as_user_and_title_as_history_input():
    bench = get_task("longlamp").load(FIXTURES / "longlamp")
    train = by_id(bench.train)
    assert train["u1-t1"]["user_id"] == "u1"
    assert train["u1-t1"]["history"][0] == {"id": "u1-a1", "input": "Zoo welcomes baby panda",
                                            "output": "The city zoo welcomed a baby panda born this spring."}
    assert train["u1-a3"]["input"] == 'Generate an abstract for the title "Panda eats bamboo at zoo".'
    # A record without an id gets "<split>-<position>".
    assert train["train-2"]["user_id"] == "u3"


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_longlamp_reads_json_and_parquet_files_like_jsonl(tmp_path, suffix):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        records = [json.loads(line) for line in (FIXTURES / "longlamp" / f"{split}.jsonl").read_text().splitlines()]
        if suffix == ".json":
            (tmp_path / f"{split}.json").write_text(json.dumps(records))
        else:
            pq.write_table(pa.Table.from_pylist(records), tmp_path / f"{split}.parquet")
    expected = get_task("longlamp").load(FIXTURES / "longlamp")
    got = get_task("longlamp").load(tmp_path)
    assert got.train == expected.train and got.test == expected.test


def test_pwab_is_loaded_through_the_registry():
    bench = get_task("pwab").load(FIXTURES / "pwab")
    assert bench.test and all(validate_sample(s, "pwab") for s in bench.train + bench.test)


# --- leakage -----------------------------------------------------------------------------

def test_no_sample_sees_its_own_output_or_a_test_gold_in_the_fixtures():
    for task in ("lamp4", "longlamp"):
        assert_no_leakage(get_task(task).load(FIXTURES / task))


def test_a_later_test_question_and_a_copy_of_its_gold_are_removed_from_test_history():
    bench = get_task("lamp4").load(FIXTURES / "lamp4")
    d2 = by_id(bench.test)["u1-d2"]
    # The raw profile held u1-d1 (a test question) and u1-x (same title as u1-d1's gold).
    assert ids(d2["history"]) == ["u1-a1", "u1-a2", "u1-t1", "u1-a3"]
    assert "u1-x" not in ids(bench.train)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
@pytest.mark.parametrize("task", ["lamp4", "longlamp"])
def test_shared_debian_data_loads_without_leakage(task):
    bench = get_task(task).load(SHARED_DATA / task)
    assert len({s["user_id"] for s in bench.test}) == 48 and len(bench.test) == 96
    assert len(bench.train) > 96 and bench.errors == []
    assert_no_leakage(bench)


# --- bad input: one test per case -------------------------------------------------------

def test_a_missing_file_is_named(tmp_path):
    data = copy_fixture(tmp_path, "lamp4")
    (data / "dev_outputs.json").unlink()
    with pytest.raises(FileNotFoundError, match="dev_outputs.json"):
        get_task("lamp4").load(data)
    with pytest.raises(FileNotFoundError, match="no LongLaMP split file"):
        get_task("longlamp").load(tmp_path / "lamp4")


def test_malformed_json_names_the_file_and_line(tmp_path):
    data = copy_fixture(tmp_path, "lamp4")
    (data / "train_questions.json").write_text('[{"id": "u1-t1",\n  "input": ]')
    with pytest.raises(ValueError, match=r"train_questions.json:2: malformed JSON"):
        get_task("lamp4").load(data)
    ll = copy_fixture(tmp_path, "longlamp")
    with open(ll / "test.jsonl", "a") as f:
        f.write('{"name": "u1", "id": \n')
    with pytest.raises(ValueError, match=r"test.jsonl:5: malformed JSON"):
        get_task("longlamp").load(ll)


def test_a_record_without_a_required_field_names_record_and_field(tmp_path):
    data = copy_fixture(tmp_path, "lamp4")
    edit_json(data / "train_questions.json", lambda qs: qs[1].pop("input"))
    with pytest.raises(ValueError, match=r"train_questions.json: record 1 \(id 'u2-t1'\): missing field 'input'"):
        get_task("lamp4").load(data)


def test_a_missing_user_id_says_the_time_based_split_is_needed(tmp_path):
    data = copy_fixture(tmp_path, "lamp4")
    edit_json(data / "dev_questions.json", lambda qs: [q.pop("user_id") for q in qs])
    with pytest.raises(ValueError, match=r"dev_questions.json: the questions have no 'user_id'.*time-based split"):
        get_task("lamp4").load(data)
    edit_json(data / "dev_questions.json", lambda qs: qs[0].__setitem__("user_id", "u1"))
    with pytest.raises(ValueError, match=r"'u1-d2'\): missing field 'user_id'.*time-based split"):
        get_task("lamp4").load(data)


def test_a_wrong_type_names_the_field_and_the_types(tmp_path):
    ll = copy_fixture(tmp_path, "longlamp")
    lines = (ll / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["profile"][1]["abstract"] = 42
    (ll / "train.jsonl").write_text("\n".join([json.dumps(rec)] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:1 \(id 'u1-t1'\) profile\[1\] \(id 'u1-a2'\): "
                                         r"field 'abstract' must be str, got int"):
        get_task("longlamp").load(ll)


def test_duplicate_question_ids_are_rejected(tmp_path):
    data = copy_fixture(tmp_path, "lamp4")
    edit_json(data / "dev_questions.json", lambda qs: qs.__setitem__(2, {**qs[2], "id": "u1-t1"}))
    edit_json(data / "dev_outputs.json", lambda o: o["golds"][2].__setitem__("id", "u1-t1"))
    with pytest.raises(ValueError, match=r"dev_questions.json: record 2 \(id 'u1-t1'\): duplicate question id"):
        get_task("lamp4").load(data)


def test_an_output_id_without_a_question_is_named(tmp_path):
    data = copy_fixture(tmp_path, "lamp4")
    edit_json(data / "train_outputs.json", lambda o: o["golds"].append({"id": "ghost", "output": "x"}))
    with pytest.raises(ValueError, match=r"train_outputs.json: output id 'ghost' has no question"):
        get_task("lamp4").load(data)


def test_an_empty_profile_is_rejected(tmp_path):
    ll = copy_fixture(tmp_path, "longlamp")
    lines = (ll / "test.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    rec["profile"] = []
    lines[2] = json.dumps(rec)
    (ll / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:3 \(id 'u2-d1'\): field 'profile' is empty"):
        get_task("longlamp").load(ll)


def test_skip_mode_reports_and_skips_only_the_bad_records(tmp_path):
    data = copy_fixture(tmp_path, "lamp4")
    edit_json(data / "dev_questions.json", lambda qs: qs[3].__setitem__("profile", []))
    bench = get_task("lamp4").load(data, on_error="skip")
    assert "u3-d1" not in ids(bench.test) and len(bench.test) == 3
    assert len(bench.errors) == 1 and "u3-d1" in bench.errors[0]


def test_stop_mode_lists_every_bad_record_at_once(tmp_path):
    data = copy_fixture(tmp_path, "lamp4")
    edit_json(data / "dev_questions.json", lambda qs: [qs[0].pop("input"), qs[3].__setitem__("input", 7)])
    with pytest.raises(ValueError, match=r"2 bad record\(s\)(.|\n)*u1-d1(.|\n)*u3-d1(.|\n)*--on-error skip"):
        get_task("lamp4").load(data)
