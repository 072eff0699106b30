"""LongLaMP abstracts, stages 01 -> 06 on the tiny model, every algorithm (a few real Debian users)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_process.artifact_io import read_json, read_jsonl
from tests.conftest import SHARED_DATA, run_stage

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "longlamp").is_dir(), reason="shared data not present")
ALGOS = ["zeroshot", "rag", "steer", "fints"]


def write_fixture(out: Path, n_users: int = 4) -> Path:
    """The first ``n_users`` users of the shared LongLaMP files, texts shortened to keep it fast."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (SHARED_DATA / "longlamp" / f"{split}.jsonl").read_text().splitlines()]
        users = sorted({r["name"] for r in rows})[:n_users]
        kept = []
        for r in rows:
            if r["name"] in users:
                r["output"] = r["output"][:160]
                r["profile"] = [{**p, "abstract": p["abstract"][:160]} for p in r["profile"][:6]]
                kept.append(r)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("longlamp")
    config = {
        "task": "longlamp", "run_dir": str(root / "run"), "data_dir": str(write_fixture(root / "raw")),
        "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32", "seed": 3,
        "select_users": {"num_users": 3, "num_unseen": 1, "min_history": 2, "min_train": 1},
        "collect_pairs": {"tries": 2, "history_k": 2, "max_new_tokens": 12, "max_prompt_tokens": 256,
                          "threshold": 0.5},
        "extract_vectors": {"layers": [1], "sites": ["attn", "mlp"], "max_answer_tokens": 24,
                            "save_dtype": "float32", "user_strategies": ["mean"]},
        "generate": {"history_k": 2, "layers": [1], "max_new_tokens": 12, "max_prompt_tokens": 256},
    }
    path = root / "config.json"
    path.write_text(json.dumps(config))
    for name in ("select_users", "rank_history", "collect_pairs", "extract_vectors"):
        run_stage(name, ["--config", str(path)])
    for algo in ALGOS:
        run_stage("generate", ["--config", str(path), "--algo", algo])
    scores = run_stage("evaluate", ["--config", str(path), "--plot", "false"])
    return path, root / "run", scores


def test_every_algorithm_writes_and_scores_an_abstract_for_each_test_sample(run):
    _, run_dir, scores = run
    test_ids = sorted(s["id"] for s in read_jsonl(run_dir / "ranked" / "seen_test.jsonl"))
    assert sorted(scores) == sorted(ALGOS)
    for algo in ALGOS:
        records = read_jsonl(run_dir / "generations" / "seen_test" / algo / "generations.jsonl")
        assert sorted(r["id"] for r in records) == test_ids
        assert ("Abstracts this author wrote" in records[0]["prompt"]) == (algo != "zeroshot")
        assert scores[algo]["n"] == len(test_ids) and 0 <= scores[algo]["overall"]["rougeL"] <= 1


def test_pairs_come_from_training_abstracts_and_steer_the_model(run):
    _, run_dir, _ = run
    pairs = read_jsonl(run_dir / "pairs" / "pairs.jsonl")
    train = {s["id"]: s for s in read_jsonl(run_dir / "ranked" / "train.jsonl")}
    assert pairs and all(p["chosen"] == train[p["sample_id"]]["output"] for p in pairs)
    assert read_json(run_dir / "vectors" / "manifest.json")["n_pairs"] == len(pairs)
    fints = read_json(run_dir / "generations" / "seen_test" / "fints" / "manifest.json")
    assert fints["steering"] == {"attn.1": 1.0, "mlp.1": 1.0}
    assert set(fints["users_without_vectors"]) < {s["user_id"] for s in train.values()}


def test_the_run_report_covers_longlamp(run):
    path, run_dir, _ = run
    report = run_stage("report", ["--config", str(path), "--n-boot", "200"]).read_text()
    assert "LongLaMP" in report and "| fints |" in report and "Difference to `rag`" in report
