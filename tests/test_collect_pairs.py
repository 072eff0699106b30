"""Stage 03: other users' history, the ROUGE filter, resume and the script end to end."""

from __future__ import annotations

import json

import pytest

from collect.loop import PairWriter
from collect.pairs import TextCollector, chunk_histories, other_users_pools, try_histories
from data_process.artifact_io import read_jsonl, write_jsonl
from data_process.fingerprint import fingerprint_settings
from stages.collect_pairs import CollectPairsConfig
from stages.common import with_task_defaults
from stages.workers import unfinished, user_chunks
from tasks import get_task

from .conftest import ROOT, run_stage

USERS = ["ua", "ub", "uc"]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


def sample(user: str, i: int) -> dict:
    word = WORDS[((USERS + ["ud"]).index(user) * 3 + i) % len(WORDS)]
    history = [{"id": f"{user}-h{j}", "input": f"{user} old article {j}", "output": f"{user} old title {j}"}
               for j in range(4)]
    return {"id": f"{user}-s{i}", "user_id": user, "output": f"{word} package manager tool",
            "input": f"Generate a headline for the following article: article {user}-s{i} about {word}.",
            "history": history}


SAMPLES = [sample(u, i) for u in USERS for i in range(3)]
REMAIN = [sample("ud", i) for i in range(3)]


def sample_of(message: str) -> dict:
    # Other users' samples also appear as history items: match the question only.
    return next(s for s in SAMPLES if f"following article: article {s['id']} about" in message)


class FakeGenerator:
    """Answers from a script keyed by (sample id, try); records every call."""

    def __init__(self, script=None, fail_on_call=None):
        self.script, self.fail_on_call, self.calls = script or {}, fail_on_call, []

    def __call__(self, messages):
        self.calls.append(list(messages))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        tries: dict[str, int] = {}
        answers = []
        for m in messages:
            sid = sample_of(m)["id"]
            t = tries[sid] = tries.get(sid, -1) + 1
            answers.append(self.script.get((sid, t), f"unrelated words number {t} for {sid}"))
        return answers


def run(tmp_path, generator, **settings):
    """The stage's loop in this process: its chunks of whole users, the unfinished ones collected."""
    cfg = with_task_defaults(CollectPairsConfig(**{"task": "lamp4", "samples_per_chunk": 2, "seed": 1, **settings}))
    collector = TextCollector(cfg, get_task("lamp4"), SAMPLES + REMAIN, None, None, generate=generator)
    writer = PairWriter(tmp_path)
    try:
        for chunk in unfinished(user_chunks(SAMPLES, lambda s: s["user_id"], cfg.samples_per_chunk), writer.done_ids):
            writer.add(*collector.chunk(chunk.items))
    finally:
        writer.close()
    return collector.summarize(writer.markers(), {s["user_id"] for s in SAMPLES})


def test_rouge_filter_keeps_only_tries_unlike_the_gold(tmp_path):
    gold = SAMPLES[0]["output"]
    script = {(SAMPLES[0]["id"], 0): gold, (SAMPLES[0]["id"], 1): "Headline: \"A web browser\"",
              (SAMPLES[1]["id"], 0): "", (SAMPLES[1]["id"], 1): "charlie package tool manager",
              (SAMPLES[2]["id"], 0): "same answer", (SAMPLES[2]["id"], 1): "same answer"}
    summary = run(tmp_path, FakeGenerator(script), threshold=0.5)
    pairs = {p["pair_id"]: p for p in read_jsonl(tmp_path / "pairs.jsonl")}
    assert f"{SAMPLES[0]['id']}-n0" not in pairs
    kept = pairs[f"{SAMPLES[0]['id']}-n1"]
    assert kept["rejected"] == "A web browser" and kept["chosen"] == gold and kept["rouge_l"] == 0.0
    assert kept["prompt"].startswith("Generate a headline for the following article: article ua-s0")
    assert "Headline:" not in kept["prompt"]  # the pair's prompt carries no history
    assert kept["query"] == get_task("lamp4").query(SAMPLES[0])  # what stage 05 retrieves it by
    assert not any(p["sample_id"] == SAMPLES[1]["id"] for p in pairs.values())  # empty + similar
    assert [p["pair_id"] for p in pairs.values() if p["sample_id"] == SAMPLES[2]["id"]] == ["ua-s2-n0"]
    ua = summary["per_user"]["ua"]
    assert (ua["kept"], ua["dropped_similar"], ua["dropped_empty"], ua["dropped_duplicate"]) == (2, 2, 1, 1)
    assert summary["rouge_l"]["kept_below"]["0.5"] == summary["totals"]["kept"]


def test_users_left_without_pairs_are_reported(tmp_path):
    script = {(s["id"], t): s["output"] for s in SAMPLES if s["user_id"] == "ub" for t in range(2)}
    summary = run(tmp_path, FakeGenerator(script))
    assert summary["users_without_pairs"] == ["ub"]
    assert summary["totals"]["kept"] == 12 and summary["totals"]["samples"] == 9


def test_other_users_history_never_includes_the_users_own_items():
    shared = {**REMAIN[0], "id": "ua-h1"}  # another user's copy of one of ua's history items
    pools = other_users_pools(SAMPLES, SAMPLES + REMAIN + [shared])
    for s in SAMPLES:
        own_ids = {x["id"] for x in SAMPLES if x["user_id"] == s["user_id"]} | {h["id"] for h in s["history"]}
        for history in try_histories(s, pools[s["user_id"]], k=5, tries=3, rag="others", seed=0):
            assert len(history) == 5
            assert all(h["user_id"] != s["user_id"] and h["id"] not in own_ids for h in history)


def test_rag_history_uses_the_users_own_ranked_history_first():
    histories = try_histories(SAMPLES[0], [], k=2, tries=2, rag="history", seed=0)
    assert histories[0] == SAMPLES[0]["history"][:2]
    assert all(h in SAMPLES[0]["history"] for h in histories[1])


def test_seeded_runs_are_identical_and_seeds_matter(tmp_path):
    first, second, other = FakeGenerator(), FakeGenerator(), FakeGenerator()
    run(tmp_path / "a", first)
    run(tmp_path / "b", second)
    run(tmp_path / "c", other, seed=2)
    assert first.calls == second.calls and first.calls != other.calls
    assert (tmp_path / "a" / "pairs.jsonl").read_text() == (tmp_path / "b" / "pairs.jsonl").read_text()


def test_all_tries_of_a_chunk_of_samples_go_to_the_generator_at_once(tmp_path):
    fake = FakeGenerator()
    run(tmp_path, fake, samples_per_chunk=6, tries=3)
    assert [len(c) for c in fake.calls] == [18, 9]  # the stage's chunks (whole users), no second chunking


def test_a_killed_collection_resumes_without_duplicates_or_gaps(tmp_path):
    full = tmp_path / "full"
    run(full, FakeGenerator())
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(resumed, FakeGenerator(fail_on_call=3))  # chunks 1 and 2 (ua: 3 samples) finished
    # A kill between a sample's pairs and its done-marker leaves pairs of an open sample.
    with open(resumed / "pairs.jsonl", "a") as f:
        f.write(json.dumps({"pair_id": "ub-s2-n0", "sample_id": "ub-s2", "user_id": "ub"}) + "\n")
        f.write('{"pair_id": "ub-s2-n1", "sam')  # and a torn line
    again = FakeGenerator()
    summary = run(resumed, again)
    assert sum(len(c) for c in again.calls) == (9 - 3) * 2  # finished samples are not redone
    assert read_jsonl(resumed / "pairs.jsonl") == read_jsonl(full / "pairs.jsonl")
    assert summary["totals"]["samples"] == 9
    assert len(read_jsonl(resumed / "progress.jsonl")) == 9


def test_samples_that_kept_no_pair_are_not_redone(tmp_path):
    script = {(s["id"], t): s["output"] for s in SAMPLES for t in range(2)}
    run(tmp_path, FakeGenerator(script))
    again = FakeGenerator()
    run(tmp_path, again)
    assert again.calls == [] and read_jsonl(tmp_path / "pairs.jsonl") == []


def test_the_stage_collects_pairs_with_a_tiny_model_and_skips_when_done(tmp_path, tiny_llama_dir, caplog):
    write_jsonl(tmp_path / "ranked" / "train.jsonl", SAMPLES)
    write_jsonl(tmp_path / "ranked" / "remain_train.jsonl", REMAIN)
    argv = ["--task", "lamp4", "--run-dir", str(tmp_path), "--model", "models/not-this-one",
            "--collect-model", str(tiny_llama_dir), "--device", "cpu", "--threshold", "1.0",
            "--max-new-tokens", "4", "--batch-size", "4", "--max-samples", "4"]
    run_stage("collect_pairs", argv)
    pairs = read_jsonl(tmp_path / "pairs" / "pairs.jsonl")
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    summary = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert summary["totals"]["samples"] == 4 and summary["totals"]["tries"] == 8
    assert len(pairs) == summary["totals"]["kept"]
    assert {p["sample_id"] for p in pairs} <= {s["id"] for s in SAMPLES[:4]}
    assert manifest["stage"] == "03_collect_pairs" and manifest["totals"] == summary["totals"]
    assert "kept" in caplog.text
    caplog.clear()
    run_stage("collect_pairs", argv)
    assert "already finished" in caplog.text


def test_task_config_sections_and_task_defaults_fill_a_copy_of_the_stage_config():
    from data_process.config import parse_config

    for task, threshold in [("lamp4", 0.15), ("longlamp", 0.2)]:
        cfg = parse_config(CollectPairsConfig, ["--config", str(ROOT / "configs" / f"{task}.json")])
        assert with_task_defaults(cfg).threshold == threshold
        assert cfg.threshold is None  # the parsed config is left as it was given
    cfg = parse_config(CollectPairsConfig, ["--config", str(ROOT / "configs" / "lamp4.json"), "--threshold", "0.4"])
    assert with_task_defaults(cfg).threshold == 0.4  # a flag wins over the task's default
    cfg = with_task_defaults(parse_config(CollectPairsConfig, ["--config", str(ROOT / "configs" / "pwab.json")]))
    assert (cfg.search_threshold, cfg.review_threshold, cfg.positive_k) == (0.65, 0.51, 5)


def test_shared_prompt_and_decoding_sections_are_stated_once_and_a_stage_section_overrides_them():
    from data_process.config import parse_config
    from stages.generate import GenerateConfig
    from stages.train_lora import TrainLoraConfig

    demo = ["--config", str(ROOT / "configs" / "demo.json")]
    gen, lora, pairs = (parse_config(c, demo) for c in (GenerateConfig, TrainLoraConfig, CollectPairsConfig))
    assert (gen.history_k, gen.max_prompt_tokens) == (lora.history_k, lora.max_prompt_tokens) == (3, 384)
    assert (pairs.history_k, pairs.max_prompt_tokens) == (2, 256)  # 03 says so in its own section
    assert gen.max_new_tokens == pairs.max_new_tokens == 20
    assert parse_config(GenerateConfig, [*demo, "--history-k", "1"]).history_k == 1  # a flag wins


class FakeCollector:
    """Records what the stage hands it; one pair for the first sample of each chunk."""

    seen: dict = {}

    def __init__(self, cfg, task, other_samples, model, tok):
        FakeCollector.seen.update(task=task.name, others=len(other_samples), positive_k=cfg.positive_k)

    def chunk(self, samples):
        FakeCollector.seen.setdefault("chunks", []).append(len(samples))
        pairs = [{"pair_id": "p0", "user_id": samples[0]["user_id"], "sample_id": samples[0]["id"], "prompt": "q",
                  "chosen": "c", "rejected": "r", "rouge_l": 0.0, "score": 0.1}]
        markers = [{"sample_id": s["id"], "user_id": s["user_id"], "tries": 1, "kept": int(i == 0)}
                   for i, s in enumerate(samples)]
        return pairs, markers

    @staticmethod
    def summarize(markers, users):
        from collect.pwab_pairs import summarize_pwab

        return summarize_pwab(markers, users)


def test_the_stage_hands_its_chunks_to_the_task_s_collector(tmp_path, tiny_llama_dir, monkeypatch):
    import collect

    monkeypatch.setitem(collect.COLLECTORS, "tool_calls", FakeCollector)
    write_jsonl(tmp_path / "ranked" / "train.jsonl", SAMPLES)
    run_stage("collect_pairs", ["--task", "pwab", "--run-dir", str(tmp_path), "--model", str(tiny_llama_dir),
                                "--device", "cpu", "--samples-per-chunk", "6"])
    assert FakeCollector.seen == {"task": "pwab", "others": 9, "positive_k": 5, "chunks": [6, 3]}
    summary = json.loads((tmp_path / "pairs" / "summary.json").read_text())
    assert summary["pwab"]["positives"] == 0 and summary["totals"]["kept"] == 2
    assert len(read_jsonl(tmp_path / "pairs" / "pairs.jsonl")) == 2
    assert len(read_jsonl(tmp_path / "pairs" / "progress.jsonl")) == 9


def test_a_chunk_pool_gives_every_try_of_a_chunk_the_same_other_users_items():
    chunk = [s for s in SAMPLES if s["user_id"] in ("ua", "ub")]
    pools = other_users_pools(chunk, SAMPLES + REMAIN)
    k = 2
    histories = chunk_histories(chunk, pools, tries=3, seed=0, need=k, draw=lambda rng, pool: rng.sample(pool, k))
    for t in range(3):
        drawn = {tuple(h["id"] for h in histories[s["id"]][t]) for s in chunk}
        assert len(drawn) == 1  # one draw per chunk and try
        assert all(h["user_id"] not in ("ua", "ub") for h in histories[chunk[0]["id"]][t])
    assert len({tuple(h["id"] for h in histories[chunk[0]["id"]][t]) for t in range(3)}) > 1
    # Fewer shared items than a try needs: each user draws from its own pool.
    alone = chunk_histories(chunk, pools, tries=1, seed=0, need=99, draw=lambda rng, pool: rng.sample(pool, 9))
    for s in chunk:
        assert all(h["user_id"] != s["user_id"] for h in alone[s["id"]][0])
    assert len({tuple(h["id"] for h in alone[s["id"]][0]) for s in chunk}) == 2


def test_a_chunk_pool_is_drawn_by_chunk_not_by_the_order_samples_are_computed_in(tmp_path):
    full, again = FakeGenerator(), FakeGenerator()
    run(tmp_path / "a", full, others_pool="chunk")
    resumed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        run(resumed, FakeGenerator(fail_on_call=3), others_pool="chunk")
    run(resumed, again, others_pool="chunk")
    assert read_jsonl(resumed / "pairs.jsonl") == read_jsonl(tmp_path / "a" / "pairs.jsonl")
    prompts = [m for call in full.calls for m in call]
    chunks = user_chunks(SAMPLES, lambda s: s["user_id"], 2)
    # Every prompt of a chunk's try shares its history: one history text per chunk and try.
    assert len({m.split("Generate a headline")[0] for m in prompts}) == len(chunks) * 2 < len(prompts)


def test_the_chunk_pool_needs_other_users_items_and_makes_the_chunk_size_part_of_the_settings():
    with pytest.raises(ValueError, match="needs --rag others"):
        run_cfg = with_task_defaults(CollectPairsConfig(task="lamp4", others_pool="chunk", rag="history"))
        TextCollector(run_cfg, get_task("lamp4"), SAMPLES, None, None, generate=FakeGenerator())
    sample_pool = CollectPairsConfig(task="lamp4", samples_per_chunk=2)
    chunk_pool = CollectPairsConfig(task="lamp4", samples_per_chunk=2, others_pool="chunk")
    assert "samples_per_chunk" not in fingerprint_settings(sample_pool)
    assert fingerprint_settings(chunk_pool)["samples_per_chunk"] == 2
    assert "share_prefix" not in fingerprint_settings(chunk_pool)


@pytest.mark.parametrize("others_pool", ["sample", "chunk"])
def test_the_stage_writes_the_same_pairs_at_any_batch_size_with_shared_prefixes(tmp_path, tiny_llama_dir, others_pool):
    outputs = []
    for batch_size, share in (("1", "false"), ("4", "true"), ("3", "true")):
        run_dir = tmp_path / f"b{batch_size}{share}"
        write_jsonl(run_dir / "ranked" / "train.jsonl", SAMPLES)
        write_jsonl(run_dir / "ranked" / "remain_train.jsonl", REMAIN)
        run_stage("collect_pairs", ["--task", "lamp4", "--run-dir", str(run_dir), "--model", str(tiny_llama_dir),
                                    "--device", "cpu", "--threshold", "1.0", "--max-new-tokens", "5",
                                    "--batch-size", batch_size, "--share-prefix", share, "--samples-per-chunk", "6",
                                    "--others-pool", others_pool, "--history-k", "2"])
        outputs.append((run_dir / "pairs" / "pairs.jsonl").read_text())
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0]
