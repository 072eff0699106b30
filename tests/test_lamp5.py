"""LaMP-5 (scholarly title generation): the fixture, the loader, the prompt, the config, and
stages 01 -> 06 on the tiny model for every algorithm.

The fixture (tests/fixtures/lamp5) is written by its own make_fixture.py: 8 authors, 16
training and 11 dev questions whose profiles (6-10 papers) hold only the author's earlier
papers, in time order.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from data_process.artifact_io import read_json, read_jsonl
from data_process.config import STAGE_SECTIONS, parse_config
from data_process.schema import validate_sample
from tasks import get_task

from .conftest import FIXTURES, ROOT

DATA = FIXTURES / "lamp5"
CONFIG = ROOT / "configs" / "lamp5.json"
INSTRUCTION = "Generate a title for the following abstract of a paper: "
TASK = get_task("lamp5")
ALGOS = ["zeroshot", "rag", "steer", "fints"]


def ids(samples):
    return [s["id"] for s in samples]


def by_id(samples):
    return {s["id"]: s for s in samples}


def raw(split: str) -> tuple[list[dict], dict[str, str]]:
    """A split's raw questions and its gold titles by question id."""
    questions = json.loads((DATA / f"{split}_questions.json").read_text())
    outputs = json.loads((DATA / f"{split}_outputs.json").read_text())
    return questions, {g["id"]: g["output"] for g in outputs["golds"]}


def timelines() -> dict[str, list[dict]]:
    """Each author's papers in time order: the longest profile plus the last question."""
    papers: dict[str, list[dict]] = {}
    for split in ("train", "dev"):
        questions, golds = raw(split)
        for q in questions:
            own = {"id": q["id"], "title": golds[q["id"]], "abstract": q["input"][len(INSTRUCTION):]}
            if len(q["profile"]) + 1 > len(papers.get(q["user_id"], [])):
                papers[q["user_id"]] = q["profile"] + [own]
    return papers


# --- the fixture -------------------------------------------------------------------------

def test_fixture_has_the_official_lamp5_layout_and_size():
    train, train_golds = raw("train")
    dev, dev_golds = raw("dev")
    for split in ("train", "dev"):
        assert read_json(DATA / f"{split}_outputs.json")["task"] == "LaMP_5"
    assert len(train) == len(train_golds) == 16 and len(dev) == len(dev_golds) == 11
    assert ids(train) == list(train_golds) and ids(dev) == list(dev_golds)
    users = defaultdict(lambda: {"train": 0, "dev": 0})
    for split, questions in (("train", train), ("dev", dev)):
        for q in questions:
            assert set(q) == {"id", "input", "user_id", "profile"}
            assert q["input"].startswith(INSTRUCTION) and len(q["input"]) > len(INSTRUCTION) + 50
            assert 6 <= len(q["profile"]) <= 10
            for item in q["profile"]:
                assert set(item) == {"id", "title", "abstract", "date"}
            users[q["user_id"]][split] += 1
    assert len(users) == 8
    assert all(c["train"] == 2 and c["dev"] in (1, 2) for c in users.values())
    assert sum((DATA / f).stat().st_size for f in ("train_questions.json", "dev_questions.json")) < 150_000


def test_fixture_profiles_hold_only_earlier_papers_in_time_order():
    papers = timelines()
    all_ids = [p["id"] for items in papers.values() for p in items]
    assert len(all_ids) == len(set(all_ids))  # ids unique across authors
    for split in ("train", "dev"):
        for q in raw(split)[0]:
            timeline = papers[q["user_id"]]
            position = ids(timeline).index(q["id"])
            # The profile is exactly the author's papers before the question, dated in order.
            assert q["profile"] == timeline[:position]
            dates = [p["date"] for p in q["profile"]]
            assert dates == sorted(dates) and len(set(dates)) == len(dates)


def test_generator_rewrites_the_fixture_byte_for_byte(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_lamp5_fixture", DATA / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.write(tmp_path)
    assert sorted(p.name for p in written) == ["dev_outputs.json", "dev_questions.json",
                                                "train_outputs.json", "train_questions.json"]
    for path in written:
        assert path.read_bytes() == (DATA / path.name).read_bytes(), path.name


# --- the loader ----------------------------------------------------------------------------

def test_loader_maps_abstracts_to_history_inputs_and_titles_to_outputs():
    bench = TASK.load(DATA)
    train, test = by_id(bench.train), by_id(bench.test)
    assert bench.errors == []
    assert set(test) == set(raw("dev")[1])
    assert set(raw("train")[1]) <= set(train)
    for s in bench.train + bench.test:
        validate_sample(s, "lamp5")
    t1 = train["u3-t1"]
    assert t1["user_id"] == "u3" and t1["output"] == "On the Hardness of Learning Sparse Parities with Noise"
    assert t1["input"].startswith(INSTRUCTION)
    first = raw("train")[0][ids(raw("train")[0]).index("u3-t1")]["profile"][0]
    assert t1["history"][0] == {"id": "u3-p1", "input": first["abstract"], "output": first["title"],
                                "date": first["date"]}


def test_history_is_in_time_order_and_promoted_papers_are_posed_as_title_questions():
    bench = TASK.load(DATA, include_history_samples=True)
    papers = timelines()
    dev_ids = set(raw("dev")[1])
    for user, timeline in papers.items():
        # Every earlier paper that is not a dev question is a training sample, in time order.
        expected = [p["id"] for p in timeline if p["id"] not in dev_ids]
        assert ids(s for s in bench.train if s["user_id"] == user) == expected
    promoted = [s for s in bench.train if s.get("source") == "history"]
    assert len(promoted) == sum(len(t) for t in papers.values()) - 16 - 11
    for s in promoted:
        paper = next(p for p in papers[s["user_id"]] if p["id"] == s["id"])
        assert s["input"] == INSTRUCTION + paper["abstract"] and s["output"] == paper["title"]
        # Only the papers before it, in time order.
        timeline = ids(papers[s["user_id"]])
        assert ids(s["history"]) == timeline[:timeline.index(s["id"])]
    u1_p7 = by_id(bench.train)["u1-p7"]
    assert ids(u1_p7["history"]) == ["u1-p1", "u1-p2", "u1-p3", "u1-p4", "u1-p5", "u1-p6", "u1-t1"]
    only_questions = TASK.load(DATA, include_history_samples=False)
    assert sorted(ids(only_questions.train)) == sorted(raw("train")[1])


def test_no_sample_sees_its_own_title_or_its_authors_dev_golds():
    bench = TASK.load(DATA)
    test_ids = {(s["user_id"], s["id"]) for s in bench.test}
    test_golds = {(s["user_id"], s["output"]) for s in bench.test}
    for s in bench.train + bench.test:
        for h in s["history"]:
            assert h["id"] != s["id"] and h["output"] != s["output"], s["id"]
            assert (s["user_id"], h["id"]) not in test_ids, (s["id"], h["id"])
            assert (s["user_id"], h["output"]) not in test_golds, (s["id"], h["id"])
        assert all(h["id"].startswith(s["user_id"] + "-") for h in s["history"])
    assert not set(ids(bench.train)) & set(ids(bench.test))
    # The second dev question's raw profile holds the first; the loader drops it.
    d2 = by_id(bench.test)["u1-d2"]
    assert "u1-d1" in [p["id"] for p in raw("dev")[0][1]["profile"]]
    assert ids(d2["history"]) == ["u1-p1", "u1-p2", "u1-p3", "u1-p4", "u1-p5", "u1-p6", "u1-t1", "u1-p7", "u1-t2"]


# --- the prompt ------------------------------------------------------------------------------

def test_prompt_lists_history_titles_and_abstracts_above_the_question():
    sample = by_id(TASK.load(DATA).test)["u3-d1"]
    abstract = sample["input"][len(INSTRUCTION):]
    history = sample["history"][:2]
    prompt = TASK.prompt(sample, history, max_prompt_tokens=10_000)
    lines = prompt.splitlines()
    assert lines[0] == "Titles this author gave earlier papers:"
    for line, item in zip(lines[1:3], history, strict=True):
        assert line == f'- Title: "{item["output"]}" for abstract: "{item["input"]}"'
    assert prompt.endswith(f"\n\n{INSTRUCTION}{abstract}\nWrite only the title.")
    assert TASK.prompt(sample, []) == f"{INSTRUCTION}{abstract}\nWrite only the title."


def test_prompt_fits_its_token_budget_by_shortening_history_never_the_question():
    sample = by_id(TASK.load(DATA).test)["u1-d1"]
    question = TASK.prompt(sample, [])
    budget = len(question.split()) + 60
    prompt = TASK.prompt(sample, sample["history"], max_prompt_tokens=budget)
    assert prompt.endswith(question) and len(prompt.split()) <= budget
    assert prompt.startswith("Titles this author gave earlier papers:")


def test_postprocess_takes_the_first_line_without_a_title_label():
    assert TASK.postprocess('Title: "Learning to See in Low Light"\nThis paper studies ...') == \
        "Learning to See in Low Light"
    assert TASK.postprocess("**Title:**\nOn the Hardness of Parities\n\nAbstract: ...") == "On the Hardness of Parities"
    assert TASK.postprocess("\n  GRASP: Robotic Grasping  \nsecond line") == "GRASP: Robotic Grasping"
    assert TASK.postprocess("") == ""


def test_query_is_the_abstract_without_the_instruction():
    sample = by_id(TASK.load(DATA).test)["u6-d1"]
    assert TASK.query(sample) == sample["input"][len(INSTRUCTION):]
    assert not TASK.query(sample).startswith("Generate")
    assert TASK.query({"input": "an abstract without the instruction"}) == "an abstract without the instruction"


# --- the config ----------------------------------------------------------------------------

def _stage_configs():
    from stages.collect_pairs import CollectPairsConfig
    from stages.evaluate import EvaluateConfig
    from stages.extract_vectors import ExtractConfig
    from stages.generate import GenerateConfig
    from stages.rank_history import RankHistoryConfig
    from stages.select_users import SelectUsersConfig
    from stages.sweep import SweepConfig

    return [SelectUsersConfig, RankHistoryConfig, CollectPairsConfig, ExtractConfig, GenerateConfig,
            EvaluateConfig, SweepConfig]


@pytest.mark.parametrize("config_cls", _stage_configs(), ids=lambda c: c.__name__)
def test_shipped_config_parses_for_every_stage_and_points_at_the_fixture(config_cls):
    cfg = parse_config(config_cls, ["--config", str(CONFIG)])
    assert cfg.task == "lamp5" and cfg.data_dir == "tests/fixtures/lamp5" and cfg.run_dir == "runs/lamp5"
    assert cfg.model == "models/smollm2-135m-instruct"


def test_shipped_config_only_sets_task_defaults_it_overrides():
    raw_config = json.loads(CONFIG.read_text())
    assert "_comment" in raw_config and "LaMP_5" in raw_config["_comment"]
    for section in STAGE_SECTIONS:
        for key, value in raw_config.get(section, {}).items():
            if key in TASK.defaults:
                assert value != TASK.defaults[key], f"{section}.{key} repeats the task default {value!r}"


# --- the pipeline on the tiny model ----------------------------------------------------------

def _argv(run_dir, model_dir, *flags):
    return ["--config", str(CONFIG), "--run-dir", str(run_dir), "--model", str(model_dir),
            "--device", "cpu", "--dtype", "float32", *flags]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_llama_dir, tiny_llama):
    """Stages 01-05 (every algorithm) of the shipped config on the tiny model; returns the run dir
    and the generation directories by algorithm."""
    from stages import collect_pairs, extract_vectors, generate, rank_history, select_users

    run_dir = tmp_path_factory.mktemp("lamp5") / "run"
    argv = _argv(run_dir, tiny_llama_dir)
    select_users.run(parse_config(select_users.SelectUsersConfig, argv))
    rank_history.run(parse_config(rank_history.RankHistoryConfig, argv))
    collect_pairs.run(parse_config(collect_pairs.CollectPairsConfig, [*argv, "--max-new-tokens", "8"]))
    extract_vectors.run(parse_config(extract_vectors.ExtractConfig, [*argv, "--layers", "1"]))
    model, tok = tiny_llama
    outs = {}
    for algo in ALGOS:
        cfg = parse_config(generate.GenerateConfig, [*argv, "--algo", algo, "--layers", "1",
                                                     "--max-new-tokens", "8", "--eval"])
        outs[algo] = generate.run(cfg, model=model, tok=tok)
        assert outs[algo] == generate.gen_dir(cfg)
    return run_dir, outs


def test_stage_01_selects_the_configured_authors_of_the_fixture(pipeline):
    run_dir, _ = pipeline
    manifest = read_json(run_dir / "data" / "manifest.json")
    assert len(manifest["seen_users"]) == 6 and len(manifest["unseen_users"]) == 2
    assert not set(manifest["seen_users"]) & set(manifest["unseen_users"])
    pairs = read_json(run_dir / "pairs" / "manifest.json")
    assert pairs["users_without_pairs"] == []


@pytest.mark.parametrize("algo", ALGOS)
def test_each_algorithm_writes_generations_and_rouge_scores(pipeline, algo):
    run_dir, outs = pipeline
    out = outs[algo]
    assert out == run_dir / "generations" / "seen_test" / algo
    records = read_jsonl(out / "generations.jsonl")
    test_ids = ids(read_jsonl(run_dir / "ranked" / "seen_test.jsonl"))
    assert sorted(ids(records)) == sorted(test_ids) and test_ids
    for r in records:
        assert {"id", "user_id", "algo", "prompt", "generation", "gold"} <= set(r) and r["algo"] == algo
        assert ("Titles this author gave earlier papers:" in r["prompt"]) == (algo != "zeroshot")
        assert "Write only the title." in r["prompt"]
    manifest = read_json(out / "manifest.json")
    assert manifest["n_generated"] == len(test_ids) and manifest["users_without_vectors"] == []
    assert (manifest["steering"] is not None) == (algo in ("steer", "fints"))
    scores = read_json(out / "eval" / "scores.json")
    assert scores["task"] == "lamp5" and scores["n"] == len(test_ids)
    for metric in ("rouge1", "rougeL"):
        assert 0.0 <= scores["overall"][metric] <= 1.0


def test_stage_06_scores_every_algorithm_and_writes_the_table(pipeline, tiny_llama_dir):
    from stages import evaluate

    run_dir, _ = pipeline
    scores = evaluate.run(parse_config(evaluate.EvaluateConfig, _argv(run_dir, tiny_llama_dir)))
    assert sorted(scores) == sorted(ALGOS)
    for s in scores.values():
        assert {"rouge1", "rougeL"} <= set(s["overall"])
    table = (run_dir / "generations" / "seen_test" / "results.md").read_text()
    for algo in ALGOS:
        assert f"| {algo} | " in table
