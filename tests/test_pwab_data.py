"""PersonalWAB loader (tasks/pwab_data.py) and function-calling prompt (tasks/pwab.py),
tool-call parsing (eval/pwab_tools.py)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import pytest

from eval.pwab_tools import TOOLS, ToolCall, format_tool_call, parse_tool_call
from tasks import get_task
from tasks.pwab import TASK, build_pwab_prompt
from tasks.pwab_data import load_pwab, user_sequences
from tests.conftest import FIXTURES

PWAB = FIXTURES / "pwab"
COFFEE = "AGXK3COFFEE7Q"


@pytest.fixture(scope="module")
def bench():
    return load_pwab(PWAB)


def by_id(samples):
    return {s["id"]: s for s in samples}


def test_loader_reads_every_instruction_with_type_timestamp_and_target(bench):
    assert (len(bench.train), len(bench.test), bench.errors) == (11, 6, [])
    assert {s["type"] for s in bench.train} == {s["type"] for s in bench.test} == {"search", "recommend", "review"}
    for s in bench.train + bench.test:
        assert s["target"]["product_info"]["parent_asin"] and isinstance(s["timestamp"], int)
        assert json.loads(s["output"])["name"] == {"search": "search_product_by_query",
                                                   "recommend": "get_recommendations_by_history",
                                                   "review": "add_product_review"}[s["type"]]


def test_history_holds_only_behaviours_before_the_task_in_time_order(bench):
    review = by_id(bench.test)["test-0"]  # the coffee user's 6th purchase (the skillet)
    assert review["user_id"] == COFFEE
    assert [h["asin"] for h in review["history"]] == ["B0KITC0002", "B0BOOK0004", "B0KITC0003",
                                                      "B0KITC0001", "B0KITC0005"]
    for s in bench.train + bench.test:
        stamps = [h["timestamp"] for h in s["history"]]
        assert stamps == sorted(stamps) and all(t < s["timestamp"] for t in stamps)
    item = review["history"][0]
    assert item["id"] == f"B0KITC0002@{item['timestamp']}" and item["rating"] == 5.0
    assert item["output"].startswith("Brews a rich") and "French Press" in item["input"]


def test_gold_calls_name_the_target_or_the_users_sequence(bench):
    search = by_id(bench.train)["train-0"]
    assert json.loads(search["output"]) == {"name": "search_product_by_query",
                                            "arguments": {"query": "Baratza Encore Conical Burr Coffee Grinder"}}
    rec = by_id(bench.train)["train-1"]
    # PersonalWAB's recommender input: the history in the target's main_category only.
    category = rec["target"]["product_info"]["main_category"]
    same = [h["asin"] for h in rec["history"] if h["category"] == category]
    assert len(same) < len(rec["history"])  # the coffee user's book is left out
    assert json.loads(rec["output"])["arguments"]["product_sequence"] == same
    every = by_id(load_pwab(PWAB, recommend_history="all").train)["train-1"]
    assert json.loads(every["output"])["arguments"]["product_sequence"] == [h["asin"] for h in rec["history"]]
    review = by_id(bench.test)["test-0"]
    assert json.loads(review["output"])["arguments"]["review"] == review["target"]["review"]["text"]


def test_history_samples_never_see_a_test_target():
    bench = load_pwab(PWAB, include_history_samples=True)
    extra = [s for s in bench.train if s.get("source") == "history"]
    assert len(extra) == 36 - 17  # behaviours that are no task's target
    spinner = next(s for s in extra if s["target"]["product_info"]["parent_asin"] == "B0KITC0006")
    assert spinner["user_id"] == COFFEE and spinner["type"] == "review"
    assert "B0KITC0004" not in [h["asin"] for h in spinner["history"]]  # the test task's skillet
    assert len(spinner["history"]) == 5


def test_user_sequences_are_time_ordered_asins():
    seqs = user_sequences(PWAB)
    assert len(seqs) == 6 and seqs[COFFEE][:2] == ["B0KITC0002", "B0BOOK0004"]


def _copy(tmp_path):
    shutil.copytree(PWAB, tmp_path / "pwab")
    return tmp_path / "pwab"


def test_a_bad_instruction_stops_with_file_record_and_field(tmp_path):
    root = _copy(tmp_path)
    raw = json.loads((root / "user_instructions.json").read_text())
    del raw["train"][1]["type"]
    raw["test"][0]["timestamp"] = "yesterday"
    (root / "user_instructions.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"user_instructions.json: train\[1\]: field 'type'") as err:
        load_pwab(root)
    assert "test[0]: field 'timestamp'" in str(err.value)
    bench = load_pwab(root, on_error="skip")
    assert (len(bench.train), len(bench.test), len(bench.errors)) == (10, 5, 2)


def test_a_bad_history_record_names_user_and_field(tmp_path):
    root = _copy(tmp_path)
    raw = json.loads((root / "user_history_part_1.json").read_text())
    raw[COFFEE][6]["review"].pop("timestamp")
    (root / "user_history_part_1.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"user {COFFEE!r} behaviour 6: field 'review.timestamp'"):
        load_pwab(root)
    assert len(load_pwab(root, on_error="skip").errors) == 1


def test_missing_files_are_named(tmp_path):
    root = _copy(tmp_path)
    (root / "user_history_part_1.json").unlink()
    with pytest.raises(FileNotFoundError, match="user_history_part"):
        load_pwab(root)
    with pytest.raises(FileNotFoundError, match="user_instructions.json"):
        load_pwab(tmp_path)


def test_prompt_lists_tools_history_request_and_review_product(bench):
    review = by_id(bench.test)["test-0"]
    prompt = build_pwab_prompt(review, review["history"][:2])
    for name in TOOLS:
        assert name in prompt
    assert '"product_sequence": {"type": "array"' in prompt
    assert "[1] Bodum Chambord French Press Coffee Maker 34 oz | Amazon Home | rated 5/5 | review: " in prompt
    assert '" (item B0KITC0002)\n[2] ' in prompt  # the asin, which a recommend call lists, ends the line
    assert "[3]" not in prompt and review["input"] in prompt
    assert "Product to review: Lodge Cast Iron Skillet" in prompt
    bare = build_pwab_prompt(review, [])
    assert "past purchases" not in bare and bare.endswith("with arguments for this request.")
    examples = [parse_tool_call(line) for line in bare.splitlines() if "Example:" in line]
    assert [c.name for c in examples] == list(TOOLS)  # every example is itself a valid call
    # ... answering a request shown with it, whose words become the search query
    assert 'request "Find me a waterproof bluetooth speaker." -> {"name": "search_product_by_query", ' \
           '"arguments": {"query": "waterproof bluetooth speaker"}}' in bare


def test_a_history_line_leads_with_the_title_not_an_identifier(bench):
    asins = re.compile(r"^B0[A-Z0-9]{8}$")
    for s in bench.train + bench.test:
        history = s["history"][:5]
        lines = [line for line in TASK.prompt(s, history).splitlines() if re.match(r"\[\d+\] ", line)]
        assert len(lines) == len(history)
        for line, h in zip(lines, history, strict=True):
            lead = line.split("] ", 1)[1].split(" | ")[0]
            assert lead == h["title"] and not asins.match(lead) and h["asin"] not in lead and h["id"] not in lead
            assert line.endswith(f"(item {h['asin']})")


def test_the_asin_first_layout_stays_selectable_through_the_prompt_settings(bench):
    from stages.collect_pairs import CollectPairsConfig
    from stages.common import task_of, with_task_defaults

    s = by_id(bench.test)["test-0"]
    old = task_of(with_task_defaults(CollectPairsConfig(task="pwab", history_line="asin_first")))
    assert old is not TASK and TASK.history_line == "title_first"  # a configured copy; the shared task unchanged
    prompt = old.prompt(s, s["history"][:2])
    assert prompt == build_pwab_prompt(s, s["history"][:2], history_line="asin_first")
    assert "(asin | title | category | rating | review)" in prompt
    assert "[1] B0KITC0002 | Bodum Chambord French Press Coffee Maker 34 oz | Amazon Home | rated 5/5" in prompt
    assert task_of(with_task_defaults(CollectPairsConfig(task="pwab"))).prompt(s, s["history"][:2]) \
        == TASK.prompt(s, s["history"][:2])
    with pytest.raises(ValueError, match="unknown history line 'asin_last'"):
        build_pwab_prompt(s, s["history"][:2], history_line="asin_last")


def test_prompt_drops_the_least_relevant_items_to_fit_the_budget(bench, tiny_llama):
    _, tok = tiny_llama
    s = by_id(bench.test)["test-0"]
    full = build_pwab_prompt(s, s["history"], tok, max_prompt_tokens=10**6)
    budget = len(tok(build_pwab_prompt(s, s["history"][:2], tok, 10**6), add_special_tokens=False)["input_ids"])
    short = build_pwab_prompt(s, s["history"], tok, max_prompt_tokens=budget)
    assert "[5]" in full and "[2]" in short and "[3]" not in short


GOOD = '{"name": "search_product_by_query", "arguments": {"query": "burr grinder"}}'


@pytest.mark.parametrize("text", [
    GOOD,
    f"Sure! Here is the call:\n```json\n{GOOD}\n```\nHope it helps.",
    '{"tool_call": ' + GOOD + "}",
    '{"name": "search_product_by_query", "arguments": "{\\"query\\": \\"burr grinder\\"}"}',
])
def test_good_fenced_and_wrapped_calls_parse(text):
    assert parse_tool_call(text) == ToolCall("search_product_by_query", {"query": "burr grinder"})


@pytest.mark.parametrize("text, reason", [
    ("I would search for a grinder.", "no_json"),
    ('{"name": "search_product_by_query", "arguments": {"query": "burr', "no_json"),
    ('{"arguments": {"query": "x"}}', "missing_name"),
    ('{"name": "buy_now", "arguments": {}}', "unknown_tool"),
    ('{"name": "add_product_review", "arguments": ["great"]}', "bad_arguments"),
    ('{"name": "add_product_review", "arguments": {"text": "great"}}', "missing_argument"),
    ('{"name": "get_recommendations_by_history", "arguments": {"product_sequence": "B0KITC0001"}}',
     "wrong_argument_type"),
    (None, "no_json"),
])
def test_malformed_calls_are_counted_failures_not_crashes(text, reason):
    failures = Counter()
    assert parse_tool_call(text, failures) is None
    assert failures == Counter({reason: 1})
    assert parse_tool_call(text) is None  # without a counter nothing is counted, nothing raises
    assert failures == Counter({reason: 1})


def test_canonical_call_text_round_trips():
    call = ToolCall("get_recommendations_by_history", {"product_sequence": ["B1", "B2"]})
    assert parse_tool_call(format_tool_call(call)) == call


def test_the_task_postprocess_finds_the_call_after_an_echoed_schema():
    echoed = 'Arguments: {"query": {"type": "string"}}\nSo: ' + GOOD + " done"
    assert TASK.postprocess(echoed) == format_tool_call(ToolCall("search_product_by_query", {"query": "burr grinder"}))
    assert TASK.postprocess("  no call here ") == "no call here"


def test_the_registered_pwab_task_loads_and_prompts_like_the_module_functions(bench):
    assert get_task("pwab") is TASK
    loaded = TASK.load(PWAB)
    assert (loaded.train, loaded.test) == (bench.train, bench.test)
    with_history = TASK.load(PWAB, include_history_samples=True)
    assert len(with_history.train) == len(load_pwab(PWAB, include_history_samples=True).train) > len(bench.train)
    review = by_id(bench.test)["test-0"]
    assert TASK.prompt(review, review["history"][:2]) == build_pwab_prompt(review, review["history"][:2])
