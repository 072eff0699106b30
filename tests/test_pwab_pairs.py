"""PersonalWAB pair collection: successful own-history calls vs. failing other-history calls."""

from __future__ import annotations

import json
import re

import pytest

from collect.loop import PairWriter
from collect.pwab_pairs import PwabCollector
from data_process.artifact_io import read_jsonl
from eval.pwab_tools import ToolCall, format_tool_call
from stages.collect_pairs import CollectPairsConfig
from stages.common import task_of, with_task_defaults
from stages.workers import unfinished, user_chunks
from tasks.pwab import TASK, build_pwab_prompt
from tasks.pwab_data import load_pwab
from tests.conftest import FIXTURES

PWAB = FIXTURES / "pwab"
REC_TARGETS = ["B0SPRT0006", "B0ELEC0006", "B0BOOK0003", "B0KITC0005", "B0PETS0001"]


class FakeEnv:
    """Search finds a product by its exact title; recommend knows the recommend targets."""

    def __init__(self, bench):
        self.titles = {s["target"]["product_info"]["title"]: s["target"]["product_info"]["parent_asin"]
                       for s in bench.train + bench.test}

    def run(self, call):
        if call.name == "search_product_by_query":
            found = self.titles.get(call.arguments["query"])
            return [found, "B0X1", "B0X2"] if found else []
        if call.name == "get_recommendations_by_history":
            return REC_TARGETS if call.arguments["product_sequence"] else []
        return call.arguments["review"]


class OneHotEncoder:
    """Equal texts get cosine 1, different texts 0."""

    def __init__(self):
        self.seen: dict[str, int] = {}

    def encode(self, texts):
        import torch

        out = torch.zeros(len(texts), 512)
        for i, t in enumerate(texts):
            out[i, self.seen.setdefault(t, len(self.seen))] = 1.0
        return out


def collect(collector, samples, out_dir, chunk_size=4):
    """The stage's loop in this process; returns (pairs, markers) written and the summary."""
    writer = PairWriter(out_dir)
    before = len(writer.markers())
    try:
        for chunk in unfinished(user_chunks(samples, lambda s: s["user_id"], chunk_size), writer.done_ids):
            writer.add(*collector.chunk(chunk.items))
    finally:
        writer.close()
    markers = writer.markers()
    summary = collector.summarize(markers, {s["user_id"] for s in samples})
    return read_jsonl(writer.pairs_path), markers[before:], summary


def listed(message: str) -> list[str]:
    """The asins of a prompt's history lines (the default layout ends a line with its asin)."""
    return re.findall(r"^\[\d+\] .*\(item (\S+)\)$", message, re.M)


def fake_model(bench):
    """Answers like a model: good calls from the user's own history, poor ones otherwise
    (another user's history makes a recommend request look like a search)."""
    samples = {s["input"]: s for s in bench.train}
    prompts = []

    def generate(messages):
        prompts.extend(messages)
        out = []
        for m in messages:
            s = samples[re.search(r"User request: (.*)", m).group(1)]
            own = bool(s["history"]) and listed(m)[:1] == [s["history"][0]["asin"]]
            title = s["target"]["product_info"]["title"]
            if s["user_id"] == "ANQ5DOGMOM9PW" and not own:
                out.append("Sorry, I cannot help with that.")          # unparseable
            elif s["type"] == "search":
                query = title if own and s["user_id"] != "AKL2YOGASKIN8" else "something else"
                out.append("```json\n" + format_tool_call(ToolCall("search_product_by_query", {"query": query}))
                           + "\n```" if own else format_tool_call(ToolCall("get_recommendations_by_history",
                                                                           {"product_sequence": []})))
            elif s["type"] == "recommend":
                out.append(format_tool_call(ToolCall("get_recommendations_by_history", {
                    "product_sequence": [h["asin"] for h in s["history"]]}) if own else ToolCall(
                    "search_product_by_query", {"query": "something else"})))
            else:
                out.append(format_tool_call(ToolCall("add_product_review", {"review": "zzz"})))
        return out

    return generate, prompts


def test_unset_pwab_settings_come_from_the_task_and_set_ones_are_kept():
    given = CollectPairsConfig(task="pwab", history_k=3, search_threshold=0.9)
    assert task_of(given) is TASK
    cfg = with_task_defaults(given)
    assert given.positive_k is None  # the defaults fill a copy
    assert (cfg.history_k, cfg.search_threshold) == (3, 0.9)
    assert (cfg.positive_k, cfg.review_threshold, cfg.recommend_in_list, cfg.max_new_tokens) == (5, 0.51, False, 128)
    assert (cfg.positive_tries, cfg.positive_temperature, cfg.history_line) == (1, 0.8, "title_first")


class Written:
    def __init__(self, pairs, markers):
        self.pairs, self.markers = pairs, markers


@pytest.fixture()
def run(tmp_path):
    bench = load_pwab(PWAB)
    # the task's defaults fill the thresholds left unset
    cfg = with_task_defaults(CollectPairsConfig(task="pwab", history_k=3, tries=2, samples_per_chunk=4, positive_k=5))
    generate, prompts = fake_model(bench)
    collector = PwabCollector(cfg, TASK, bench.train, None, None, generate=generate, env=FakeEnv(bench),
                              encoder=OneHotEncoder())
    pairs, markers, summary = collect(collector, bench.train, tmp_path)
    return bench, cfg, Written(pairs, markers), summary, prompts, (generate, tmp_path)


def test_positives_are_correct_own_history_calls_or_the_gold_review(run):
    bench, _, writer, summary, _, _ = run
    by_sample = {p["sample_id"]: p for p in writer.pairs}
    types = {s["id"]: s["type"] for s in bench.train}
    assert {types[i] for i in by_sample} == {"search", "recommend", "review"}
    for s in bench.train:
        if s["id"] not in by_sample:
            continue
        chosen = json.loads(by_sample[s["id"]]["chosen"])
        if s["type"] == "review":
            assert by_sample[s["id"]]["chosen"] == s["output"]  # the gold review, same JSON shape
        elif s["type"] == "search":
            assert chosen["arguments"]["query"] == s["target"]["product_info"]["title"]
        else:
            assert chosen["arguments"]["product_sequence"] == [h["asin"] for h in s["history"]]
    # the yoga user's own-history search missed its target: no positive, no pair
    yoga = next(s["id"] for s in bench.train if s["user_id"] == "AKL2YOGASKIN8" and s["type"] == "search")
    assert yoga not in by_sample
    assert summary["pwab"]["positives"] == 10


def test_negatives_are_failing_calls_from_other_users_histories(run):
    bench, cfg, writer, summary, _, _ = run
    # the dog owner's other-history answers are unparseable: neither of her samples pairs up
    assert len(writer.pairs) == 8  # 2 search + 3 recommend + 3 review
    for p in writer.pairs:
        rejected = json.loads(p["rejected"])
        assert set(rejected) == {"name", "arguments"} and p["rejected_score"] < 0.51
        assert p["chosen"] != p["rejected"] and p["pair_id"].startswith(p["sample_id"] + "-n")
        assert "past purchases" not in p["prompt"]  # the pair prompt carries no history
        sample = next(s for s in bench.train if s["id"] == p["sample_id"])
        assert p["prompt"] == build_pwab_prompt(sample, [], None, cfg.max_prompt_tokens)
    totals = summary["totals"]
    assert totals["samples"] == 11 and totals["kept"] == 8 and totals["tries"] == 20
    assert totals["dropped_empty"] == 4 and totals["dropped_duplicate"] == 8  # greedy answers repeat
    assert summary["parse_failures"] == {"total": 4, "no_json": 4}
    dog = [m for m in writer.markers if m["user_id"] == "ANQ5DOGMOM9PW"]
    assert sum(m["parse_failures"].get("no_json", 0) for m in dog) == 4  # counted per sample, so a resume keeps them
    assert summary["users_without_pairs"] == ["ANQ5DOGMOM9PW"]


def test_negative_prompts_use_other_users_history(run):
    bench, cfg, _, _, prompts, _ = run
    negatives = 0
    for m in prompts:
        s = next(x for x in bench.train if f"User request: {x['input']}" in m)
        shown = listed(m)
        if shown == [h["asin"] for h in s["history"][:cfg.positive_k]]:
            continue  # the positive's prompt: the user's own history
        donors = [x for x in bench.train if x["user_id"] != s["user_id"]
                  and shown == [h["asin"] for h in x["history"][:cfg.history_k]]]
        assert donors, f"prompt of {s['id']} lists {shown}, no other user's history"
        negatives += 1
    assert negatives == 2 * 10  # two tries for each sample with a positive


def test_finished_samples_are_not_collected_again(run):
    bench, cfg, _, _, _, (generate, out_dir) = run
    asked = []

    def generate_again(messages):
        asked.extend(messages)
        return generate(messages)

    collector = PwabCollector(cfg, TASK, bench.train, None, None, generate=generate_again, env=FakeEnv(bench),
                              encoder=OneHotEncoder())
    pairs, markers, _ = collect(collector, bench.train, out_dir)
    assert markers == [] and asked == [] and len(pairs) == 8  # progress.jsonl marks them done
