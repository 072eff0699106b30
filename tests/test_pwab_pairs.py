"""PersonalWAB pair collection: successful own-history calls vs. failing other-history calls."""

from __future__ import annotations

import json
import random
import re

import pytest

from collect.loop import PairWriter
from collect.pairs import generator_for
from collect.pwab_pairs import PwabCollector, try_seed
from data_process.artifact_io import read_jsonl
from eval.pwab_tools import ToolCall, format_tool_call
from stages.collect_pairs import CollectPairsConfig
from stages.common import task_of, with_task_defaults
from stages.workers import unfinished, user_chunks
from steering.generation import prompt_seed
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


def request_of(bench):
    samples = {s["input"]: s for s in bench.train}
    return lambda message: samples[re.search(r"User request: (.*)", message).group(1)]


class MissEnv(FakeEnv):
    """The recommender never returns the target: every recommend call scores 0."""

    def run(self, call):
        if call.name == "get_recommendations_by_history":
            return ["B0MISS0001", "B0MISS0002"]
        return super().run(call)


def test_a_recommend_positive_is_any_recommender_call_as_the_seed_kept_it_and_in_list_is_an_option(tmp_path):
    bench = load_pwab(PWAB)
    sample_of = request_of(bench)

    def generate(messages):  # a recommender call with the prompt's asins, for every request
        return [format_tool_call(ToolCall("get_recommendations_by_history", {"product_sequence": listed(m)}))
                if sample_of(m)["type"] == "recommend" else
                format_tool_call(ToolCall("add_product_review", {"review": "zzz"})) for m in messages]

    results = {}
    for strict in (False, True):
        cfg = with_task_defaults(CollectPairsConfig(task="pwab", history_k=3, tries=2, recommend_in_list=strict))
        collector = PwabCollector(cfg, TASK, bench.train, None, None, generate=generate, env=MissEnv(bench),
                                  encoder=OneHotEncoder())
        results[strict] = collect(collector, bench.train, tmp_path / str(strict))
    pairs, markers, summary = results[False]
    recommend = [m for m in markers if m["type"] == "recommend"]
    assert len(recommend) == 3 and all(m["positive"] for m in recommend)  # right function, score 0: a positive
    # other users' recommender calls are successes too, so no negative: no recommend pair
    assert all(m.get("kept", 0) == 0 and m["dropped_similar"] >= 1 for m in recommend)
    assert not [p for p in pairs if p["type"] == "recommend"]
    assert summary["pwab"]["by_type"]["recommend"] == {"tasks": 3, "positive_tries": 3, "successes": 3,
                                                       "positives": 3, "kept_pairs": 0}
    _, strict_markers, strict_summary = results[True]
    assert not any(m["positive"] for m in strict_markers if m["type"] == "recommend")  # target not in the list
    assert strict_summary["pwab"]["by_type"]["recommend"]["successes"] == 0


class RankEnv(FakeEnv):
    """A search query '<title> #r' finds its target at rank r of 10 (score 1 - r/10)."""

    def run(self, call):
        if call.name == "search_product_by_query":
            title, _, rank = call.arguments["query"].rpartition(" #")
            found = self.titles.get(title)
            return ["B0X"] * int(rank) + [found] + ["B0Y"] * (9 - int(rank)) if found else []
        return super().run(call)


def seeded_model(bench, cfg, asked):
    """Emulates generate's contract: a sampled row depends on prompt_seed(seed, prompt) alone.
    Greedy search queries rank the target 5th (score 0.5, no success); sampled ones 0th-5th."""
    sample_of = request_of(bench)

    def generate(messages, **sampling):
        asked.append((len(messages), sampling))
        out = []
        for m in messages:
            s = sample_of(m)
            own = bool(s["history"]) and listed(m)[:1] == [s["history"][0]["asin"]]
            if not own:  # another user's history: a wrong function, a negative
                out.append(format_tool_call(ToolCall("add_product_review", {"review": "zzz"})))
            elif s["type"] == "search":
                rank = random.Random(prompt_seed(sampling["seed"], m)).randrange(6) if sampling else 5
                out.append(format_tool_call(ToolCall("search_product_by_query", {
                    "query": f"{s['target']['product_info']['title']} #{rank}"})))
            else:
                out.append(format_tool_call(ToolCall("get_recommendations_by_history", {
                    "product_sequence": [h["asin"] for h in s["history"]]})))
        return out

    return generate


def test_positive_tries_are_seeded_per_try_and_the_best_scoring_success_is_kept(tmp_path):
    bench = load_pwab(PWAB)
    cfg = with_task_defaults(CollectPairsConfig(task="pwab", history_k=3, tries=1, positive_tries=4))
    runs = {}
    for chunk_size in (1, 100):  # one sample per chunk, or all at once: the same calls
        asked: list = []
        collector = PwabCollector(cfg, TASK, bench.train, None, None, generate=seeded_model(bench, cfg, asked),
                                  env=RankEnv(bench), encoder=OneHotEncoder())
        runs[chunk_size] = collect(collector, bench.train, tmp_path / str(chunk_size), chunk_size), asked
    (pairs, markers, summary), asked = runs[100]
    assert runs[1][0][:2] == (pairs, markers)
    # try 0 decodes as the stage does; tries 1-3 sample, each with its own seed from (seed, try)
    sampled = [kw for _, kw in asked if kw]
    assert [kw["seed"] for kw in sampled] == [try_seed(cfg.seed, t) for t in (1, 2, 3)]
    assert all(kw["do_sample"] and kw["temperature"] == cfg.positive_temperature for kw in sampled)
    assert len({try_seed(cfg.seed, t) for t in range(1, 4)} | {try_seed(cfg.seed + 1, 1)}) == 4
    by_id = {m["sample_id"]: m for m in markers}
    for s in bench.train:
        m = by_id[s["id"]]
        if s["type"] == "review":
            assert (m["positive_tries"], m["positive_successes"], m["positive"]) == (0, 0, True)
            continue
        assert m["positive_tries"] == 4
        if s["type"] == "recommend":  # every try succeeds with the same score: the first is kept
            assert (m["positive_successes"], m["positive_try"]) == (4, 0)
            continue
        prompt = TASK.prompt(s, s["history"][:cfg.positive_k], None, cfg.max_prompt_tokens)
        ranks = [random.Random(prompt_seed(try_seed(cfg.seed, t), prompt)).randrange(6) for t in (1, 2, 3)]
        good = [(r, t) for t, r in enumerate(ranks, 1) if 1 - r / 10 > cfg.search_threshold]
        assert m["positive_successes"] == len(good) and m["positive"] == bool(good)
        if good:
            rank, t = min(good)  # the best score; on a tie the earlier try
            assert m["positive_try"] == t
            chosen = {p["chosen"] for p in pairs if p["sample_id"] == s["id"]}
            assert chosen <= {format_tool_call(ToolCall("search_product_by_query", {
                "query": f"{s['target']['product_info']['title']} #{rank}"}))}
    rows = summary["pwab"]["by_type"]
    assert {k: rows[k]["positive_tries"] for k in rows} == {"search": 16, "recommend": 12, "review": 0}
    assert {k: rows[k]["tasks"] for k in rows} == {"search": 4, "recommend": 3, "review": 4}
    assert sum(r["kept_pairs"] for r in rows.values()) == summary["totals"]["kept"] == len(pairs)
    assert summary["pwab"]["positives"] == sum(r["positives"] for r in rows.values())
    assert {p["type"] for p in pairs} <= {"search", "recommend", "review"}


def test_sampled_positive_tries_of_the_real_generator_do_not_depend_on_batch_or_chunk(tmp_path, tiny_llama):
    model, tok = tiny_llama
    bench = load_pwab(PWAB)
    asked = [s for s in bench.train if s["type"] != "review"]
    seen = {}
    for batch_size, chunk_size in ((8, 100), (1, 1)):
        cfg = with_task_defaults(CollectPairsConfig(task="pwab", history_k=2, tries=1, positive_tries=3,
                                                    max_new_tokens=24, batch_size=batch_size, max_prompt_tokens=512))
        generate = generator_for(cfg, TASK, model, tok, "test")
        answers: dict = {}

        def recorded(messages, generate=generate, answers=answers, **sampling):
            texts = generate(messages, **sampling)
            for m, text in zip(messages, texts, strict=True):
                answers[(sampling.get("seed"), m)] = text
            return texts

        collector = PwabCollector(cfg, TASK, bench.train, model, tok, generate=recorded, env=FakeEnv(bench),
                                  encoder=OneHotEncoder())
        pairs, markers, _ = collect(collector, list(reversed(asked)) if chunk_size == 1 else asked,
                                    tmp_path / str(batch_size), chunk_size)
        seen[batch_size] = answers, sorted(markers, key=lambda m: m["sample_id"]), pairs
    assert seen[8][0] == seen[1][0] and seen[8][1] == seen[1][1]
    # the tries of one prompt differ: each try has its own seed
    by_prompt: dict = {}
    for (_, m), text in seen[8][0].items():
        by_prompt.setdefault(m, set()).add(text)
    assert any(len(texts) > 1 for texts in by_prompt.values())
