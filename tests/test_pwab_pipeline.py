"""PersonalWAB stages 01 -> 06 end to end on the synthetic fixture and the tiny model.

The tiny random model writes no tool call of its own; with the task's response prefix
and constrained decoding every answer is a valid call, so stage 03 keeps pairs, stage 04
extracts vectors on the prefixed token stream and steer/fints really steer.  Users
without pairs fall back to RAG (reported); scoring reports FACC / RACC per task type.
"""

from __future__ import annotations

import importlib
import json

import pytest

from data_process.artifact_io import read_json, read_jsonl
from data_process.config import parse_config
from stages import evaluate, generate
from tests.conftest import FIXTURES

ALGOS = ["zeroshot", "rag", "steer", "fints"]
# script name -> (stage module, its config class); stage 05 and 06 are run apart below
STAGES = {"01_select_users": ("select_users", "SelectUsersConfig"),
          "02_rank_history": ("rank_history", "RankHistoryConfig"),
          "train_sasrec": ("train_sasrec", "TrainSasrecConfig"),
          "03_collect_pairs": ("collect_pairs", "CollectPairsConfig"),
          "04_extract_vectors": ("extract_vectors", "ExtractConfig")}


@pytest.fixture(scope="module")
def pwab_run(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("pwab_pipeline")
    config = root / "pwab.json"
    config.write_text(json.dumps({
        "task": "pwab", "run_dir": str(root / "run"), "data_dir": str(FIXTURES / "pwab"),
        "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32", "seed": 3,
        "select_users": {"num_users": 4, "num_unseen": 2, "min_history": 2, "min_train": 2},
        "train_sasrec": {"hidden": 16, "blocks": 1, "heads": 1, "epochs": 5, "threads": 1},
        "collect_pairs": {"tries": 1, "history_k": 2, "max_new_tokens": 80, "batch_size": 8,
                          "max_prompt_tokens": 512},
        "extract_vectors": {"layers": [1], "sites": ["attn", "mlp"], "save_dtype": "float32",
                            "user_strategies": ["mean"]},
        # a random model's pair vectors are tiny: a large multiplier makes the steering visible
        "generate": {"history_k": 2, "layers": [1], "sites": ["attn", "mlp"], "max_new_tokens": 80, "alpha": 200.0,
                     "beta": 200.0,
                     "batch_size": 4, "max_prompt_tokens": 512},
    }))
    argv = ["--config", str(config)]
    manifests = {}
    for name, (module, config_cls) in STAGES.items():
        stage = importlib.import_module(f"stages.{module}")
        manifests[name] = stage.run(parse_config(getattr(stage, config_cls), argv))
    for algo in ALGOS:
        out = generate.run(parse_config(generate.GenerateConfig, [*argv, "--algo", algo]))
        assert out == root / "run" / "generations" / "seen_test" / algo
        manifests[f"05_generate/{algo}"] = read_json(out / "manifest.json")
    scores = evaluate.run(parse_config(evaluate.EvaluateConfig, argv))
    return root / "run", scores, manifests


def test_pwab_pipeline_manifests_name_the_stage_scripts(pwab_run):
    _, _, manifests = pwab_run
    assert {name: m["stage"] for name, m in manifests.items()} == {
        **{name: name for name in STAGES}, **{f"05_generate/{a}": "05_generate" for a in ALGOS}}


def test_pwab_pipeline_scores_every_algorithm_with_facc_and_racc_per_type(pwab_run):
    run_dir, scores, _ = pwab_run
    assert sorted(scores) == sorted(ALGOS)
    test_ids = {s["id"] for s in read_jsonl(run_dir / "ranked" / "seen_test.jsonl")}
    types = {s["type"] for s in read_jsonl(run_dir / "ranked" / "seen_test.jsonl")}
    for algo, s in scores.items():
        records = read_jsonl(run_dir / "generations" / "seen_test" / algo / "generations.jsonl")
        assert {r["id"] for r in records} == test_ids
        assert all({"type", "target"} <= set(r) for r in records)
        overall = s["overall"]
        assert 0.0 <= overall["facc"] <= 1.0 and 0.0 <= overall["racc"] <= overall["facc"] + 1e-9
        assert {f"facc_{t}" for t in types} <= set(overall)
        assert s["task"] == "pwab" and s["algo"] == algo
        assert s["parse_failures"]["total"] <= len(records) * (1 - overall["facc"]) + 1e-9  # failures score 0
        assert read_json(run_dir / "generations" / "seen_test" / algo / "eval" / "manifest.json")["stage"] \
            == "06_evaluate"


def test_pwab_pipeline_with_no_pairs_runs_steering_as_rag_for_every_user(pwab_run):
    run_dir, _, _ = pwab_run
    pairs = read_jsonl(run_dir / "pairs" / "pairs.jsonl")
    manifest = read_json(run_dir / "vectors" / "manifest.json")
    assert manifest["n_pairs"] == len(pairs)
    rag = {r["id"]: r["generation"] for r in
           read_jsonl(run_dir / "generations" / "seen_test" / "rag" / "generations.jsonl")}
    users = {r["user_id"] for r in read_jsonl(run_dir / "ranked" / "seen_test.jsonl")}
    paired = {p["user_id"] for p in pairs}
    fints = read_json(run_dir / "generations" / "seen_test" / "fints" / "manifest.json")
    assert set(fints["users_without_vectors"]) == users - paired
    if not paired:  # no user has vectors: fints is exactly RAG
        out = {r["id"]: r["generation"] for r in
               read_jsonl(run_dir / "generations" / "seen_test" / "fints" / "generations.jsonl")}
        assert out == rag


def test_constrained_tool_calls_give_pairs_vectors_and_steered_calls(pwab_run):
    run_dir, scores, manifests = pwab_run
    summary = read_json(run_dir / "pairs" / "summary.json")
    assert summary["parse_failures"] == {"total": 0}  # constrained decoding: every try parses
    pairs = read_jsonl(run_dir / "pairs" / "pairs.jsonl")
    assert pairs and all(p["chosen"].startswith('{"name": "') for p in pairs)
    assert manifests["04_extract_vectors"]["n_pairs"] == len(pairs)
    assert all(s["parse_failures"]["total"] == 0 for s in scores.values())
    table = (run_dir / "generations" / "seen_test" / "results.md").read_text()
    assert "unparsed" in table and "Paired bootstrap 95% intervals against rag" in table
    intervals = table.split("intervals against rag")[1]
    assert all(f"| {algo} | " in intervals for algo in ("zeroshot", "steer", "fints")) and "| rag | " not in intervals
    gen = run_dir / "generations" / "seen_test"
    rag, fints = ({r["id"]: r["generation"] for r in read_jsonl(gen / algo / "generations.jsonl")}
                  for algo in ("rag", "fints"))
    steered = set(manifests["05_generate/fints"]["users_without_vectors"])
    differs = [i for i in rag if rag[i] != fints[i]]
    assert differs and all(json.loads(fints[i])["name"] for i in differs)
    assert not steered & {r["user_id"] for r in read_jsonl(gen / "fints" / "generations.jsonl") if r["id"] in differs}


def test_pair_retrieval_reports_the_same_type_share_of_each_request_type(pwab_run, capsys):
    from stages import pair_retrieval

    run_dir, _, _ = pwab_run
    pairs = read_jsonl(run_dir / "pairs" / "pairs.jsonl")
    assert all(p["type"] in {"search", "recommend", "review"} for p in pairs)  # 03 records the sample's type
    result = pair_retrieval.run(parse_config(generate.GenerateConfig, ["--config", str(run_dir.parent / "pwab.json"),
                                                                        "--split", "seen_test"]))
    assert read_json(run_dir / "pair_retrieval" / "seen_test.json") == result
    rows = result["by_type"]
    test = read_jsonl(run_dir / "ranked" / "seen_test.jsonl")
    assert rows["all"]["requests"] == len(test) and result["n_pairs"] == len(pairs)
    assert rows["all"]["retrieved"] == sum(r["retrieved"] for k, r in rows.items() if k != "all")
    assert "| request type | requests |" in capsys.readouterr().out


def test_sasrec_fingerprints_its_data_and_a_retrained_sasrec_makes_03_and_05_stale(pwab_run):
    from stages import collect_pairs, train_sasrec

    run_dir, _, manifests = pwab_run
    assert any("user_history_part" in p for p in manifests["train_sasrec"]["fingerprint"]["inputs"])
    assert any(p.endswith("sasrec/model.safetensors") for p in manifests["03_collect_pairs"]["fingerprint"]["inputs"])
    argv = ["--config", str(run_dir.parent / "pwab.json")]
    # Last in this module: it changes the environment the other tests' runs used.
    train_sasrec.run(parse_config(train_sasrec.TrainSasrecConfig, [*argv, "--epochs", "6", "--overwrite"]))
    with pytest.raises(ValueError, match=r"03_collect_pairs.*is stale: its inputs changed since it ran: "
                                         r"\S*sasrec/model.safetensors"):
        collect_pairs.run(parse_config(collect_pairs.CollectPairsConfig, argv))
    with pytest.raises(ValueError, match=r"05_generate.*is stale: its inputs changed since it ran: "
                                         r"\S*sasrec/model.safetensors \(upstream of \S*pairs.jsonl\)"):
        generate.run(parse_config(generate.GenerateConfig, [*argv, "--algo", "fints"]))
