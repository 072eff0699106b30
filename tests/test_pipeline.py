"""Stages 01 -> 06 end to end on the tiny model, for every algorithm, in a temp dir.

The raw LaMP-4 fixture is built here from a few users of the shipped demo data (texts
shortened so the tiny model runs in seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_process.artifact_io import read_json, read_jsonl
from stages.generate import GenerateConfig
from stages.generate import run as run_generate
from tests.conftest import ROOT, run_stage

DEMO = ROOT / "data" / "demo" / "lamp4"
ALGOS = ["zeroshot", "rag", "steer", "fints"]


def _shrink(text: str) -> str:
    return text[:120]


def write_fixture(out: Path, n_users: int = 4) -> Path:
    """Raw LaMP-4 files holding the first ``n_users`` demo users, texts shortened."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        questions = json.loads((DEMO / f"{split}_questions.json").read_text())
        users = sorted({q["user_id"] for q in questions})[:n_users]
        kept = [q for q in questions if q["user_id"] in users]
        for q in kept:
            q["input"] = _shrink(q["input"])
            q["profile"] = [{**p, "text": _shrink(p["text"])} for p in q["profile"][:8]]
        ids = {q["id"] for q in kept}
        outputs = json.loads((DEMO / f"{split}_outputs.json").read_text())
        outputs["golds"] = [g for g in outputs["golds"] if g["id"] in ids]
        (out / f"{split}_questions.json").write_text(json.dumps(kept))
        (out / f"{split}_outputs.json").write_text(json.dumps(outputs))
    return out


def write_config(path: Path, run_dir: Path, data_dir: Path, model_dir: Path) -> Path:
    config = {
        "task": "lamp4", "run_dir": str(run_dir), "data_dir": str(data_dir), "model": str(model_dir),
        "device": "cpu", "dtype": "float32", "seed": 7,
        "select_users": {"num_users": 3, "num_unseen": 1, "min_history": 2, "min_train": 1,
                         "history_rate": 0.5},
        "collect_pairs": {"tries": 2, "history_k": 2, "max_new_tokens": 8, "batch_size": 8,
                          "max_prompt_tokens": 256, "threshold": 0.5},
        "extract_vectors": {"layers": [1], "sites": ["attn", "mlp"], "batch_size": 8,
                            "max_answer_tokens": 16, "save_dtype": "float32", "user_strategies": ["mean", "pca"]},
        "generate": {"history_k": 2, "layers": [1], "sites": ["attn", "mlp"], "max_new_tokens": 8,
                     "batch_size": 3, "max_prompt_tokens": 256},
    }
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    """A run directory with stages 01-04 done; returns (config path, run dir)."""
    root = tmp_path_factory.mktemp("pipeline")
    config = write_config(root / "config.json", root / "run", write_fixture(root / "raw"), tiny_llama_dir)
    for name in ("select_users", "rank_history", "collect_pairs", "extract_vectors"):
        run_stage(name, ["--config", str(config)])
    return config, root / "run"


def generate(config: Path, *flags: str) -> Path:
    from data_process.config import parse_config

    return run_generate(parse_config(GenerateConfig, ["--config", str(config), *flags]))


def generations(out: Path) -> dict[str, str]:
    return {r["id"]: r["generation"] for r in read_jsonl(out / "generations.jsonl")}


@pytest.mark.parametrize("algo", ALGOS)
def test_each_algorithm_runs_end_to_end_and_scores_every_seen_test_sample(run, algo):
    config, run_dir = run
    out = generate(config, "--algo", algo, "--eval")
    assert out == run_dir / "generations" / "seen_test" / algo
    records = read_jsonl(out / "generations.jsonl")
    test_ids = [s["id"] for s in read_jsonl(run_dir / "ranked" / "seen_test.jsonl")]
    assert sorted(r["id"] for r in records) == sorted(test_ids)
    for r in records:
        assert set(r) == {"id", "user_id", "algo", "prompt", "generation", "gold"} and r["algo"] == algo
        assert ("Headlines this author wrote" in r["prompt"]) == (algo != "zeroshot")
    manifest = read_json(out / "manifest.json")
    assert manifest["n_generated"] == len(test_ids) and manifest["users_without_vectors"] == []
    assert (manifest["steering"] is not None) == (algo in ("steer", "fints"))
    scores = read_json(out / "eval" / "scores.json")
    assert scores["n"] == len(test_ids) and 0.0 <= scores["overall"]["rougeL"] <= 1.0
    assert (out / "eval" / "manifest.json").exists()


def test_stage_06_logs_a_table_with_every_algorithm(run, caplog):
    config, run_dir = run
    for algo in ALGOS:
        generate(config, "--algo", algo)
    scores = run_stage("evaluate", ["--config", str(config)])
    assert sorted(scores) == sorted(ALGOS)
    printed = caplog.text
    for algo in ALGOS:
        assert f"| {algo} | " in printed
    assert (run_dir / "generations" / "seen_test" / "results.md").exists()


def test_fints_with_multiplier_zero_equals_rag_token_for_token(run):
    config, _ = run
    rag = generations(generate(config, "--algo", "rag"))
    zero = generations(generate(config, "--algo", "fints", "--multipliers", "0", "--tag", "_m0"))
    strong = generations(generate(config, "--algo", "fints", "--multipliers", "50", "--tag", "_m50"))
    assert zero == rag
    assert strong != rag  # the vectors do steer, so the equality above is not vacuous


def test_unseen_users_get_plain_rag_and_are_reported(run, caplog):
    config, run_dir = run
    unseen = sorted({s["user_id"] for s in read_jsonl(run_dir / "ranked" / "unseen_test.jsonl")})
    rag = generations(generate(config, "--algo", "rag", "--split", "unseen_test"))
    for algo in ("steer", "fints"):
        out = generate(config, "--algo", algo, "--split", "unseen_test", "--alpha", "50", "--beta", "50")
        assert read_json(out / "manifest.json")["users_without_vectors"] == unseen
        assert generations(out) == rag
    assert "ran as plain RAG" in caplog.text


def test_a_killed_generation_resumes_to_the_same_file_byte_for_byte(run, monkeypatch):
    import steering.runner

    config, _ = run
    # Chunks of 2 samples (one user each here) with batches of 3: the kill comes in the
    # second chunk, after the first was written.
    chunked = ("--samples-per-chunk", "2")
    full = generate(config, "--algo", "fints", "--tag", "_full", *chunked) / "generations.jsonl"
    real, batches = steering.runner.generate_batches, []

    def dies_on_second_batch(*args, **kwargs):
        for batch in real(*args, **kwargs):
            batches.append(1)
            if len(batches) == 2:
                raise KeyboardInterrupt("killed")
            yield batch

    monkeypatch.setattr(steering.runner, "generate_batches", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate(config, "--algo", "fints", "--tag", "_killed", *chunked)
    out = Path(config).parent / "run" / "generations" / "seen_test" / "fints_killed"
    assert not (out / "manifest.json").exists()
    with open(out / "generations.jsonl", "a") as f:
        f.write('{"id": "torn')  # a write cut off by the kill
    done_before = len(read_jsonl(out / "generations.jsonl"))
    monkeypatch.setattr(steering.runner, "generate_batches", real)
    generate(config, "--algo", "fints", "--tag", "_killed", *chunked)
    # The resumed run wrote its remaining records after the first run's, yet the file is
    # the uninterrupted run's, line for line.
    assert (out / "generations.jsonl").read_bytes() == full.read_bytes()
    assert read_json(out / "manifest.json")["n_resumed"] == done_before > 0
    ids = [r["id"] for r in read_jsonl(full)]
    assert ids == [s["id"] for s in read_jsonl(Path(config).parent / "run" / "ranked" / "seen_test.jsonl")]


def test_a_finished_generation_is_skipped(run, caplog):
    config, _ = run
    out = generate(config, "--algo", "zeroshot")
    before = (out / "generations.jsonl").stat().st_mtime_ns
    generate(config, "--algo", "zeroshot")
    assert (out / "generations.jsonl").stat().st_mtime_ns == before
    assert "already finished" in caplog.text


def test_an_unknown_algorithm_gets_a_did_you_mean(run):
    config, _ = run
    with pytest.raises(ValueError, match="Did you mean 'fints'"):
        generate(config, "--algo", "fintz")


def test_sweep_writes_a_table_and_a_plot_of_rouge_l_per_layer_and_multiplier(run):
    config, run_dir = run
    points = run_stage("sweep", ["--config", str(config), "--sweep-layers", "1", "--sweep-multipliers", "0", "2"])
    assert [(p["layer"], p["multiplier"]) for p in points] == [(1, 0.0), (1, 2.0)]
    out = run_dir / "sweep" / "seen_test"
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "| L1 x2 |" in (out / "sweep.md").read_text()
    rag = generations(generate(config, "--algo", "rag"))
    assert generations(run_dir / "generations" / "seen_test" / "fints_sweep_L1_m0") == rag
