"""scripts/tune on the tiny model: settings chosen on seen_val, tested once, one report."""

from __future__ import annotations

import json

import pytest

from data_process.artifact_io import read_json, read_jsonl
from eval.bootstrap import bootstrap_diff
from eval.run_report import share_of_users_better
from stages.tune import best, covering
from tests.conftest import run_stage
from tests.test_pipeline import write_config, write_fixture


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("tune")
    config = write_config(root / "config.json", root / "run", write_fixture(root / "raw"), tiny_llama_dir)
    raw = json.loads(config.read_text())
    raw["select_users"]["clusters"] = True
    config.write_text(json.dumps(raw))
    for name in ("select_users", "rank_history", "collect_pairs"):
        run_stage(name, ["--config", str(config)])
    result = run_stage("tune", ["--config", str(config), "--tune-layers", "0", "1", "--tune-multipliers", "0", "4",
                                "--tune-top-pairs", "5", "--tune-temperatures", "0.1", "1", "--n-boot", "200"])
    return config, root / "run", result


def test_validation_answers_never_reach_pairs_or_vectors(tuned):
    _, run_dir, _ = tuned
    val = read_jsonl(run_dir / "data" / "seen_val.jsonl")
    test = read_jsonl(run_dir / "data" / "seen_test.jsonl")
    assert val and {s["user_id"] for s in val} == {s["user_id"] for s in test}
    pairs = read_jsonl(run_dir / "pairs" / "pairs.jsonl")
    golds = {s["output"] for s in val}
    assert not {p["sample_id"] for p in pairs} & {s["id"] for s in val}
    assert not {p["chosen"] for p in pairs} & golds


def test_each_method_is_chosen_on_validation_and_tested_once(tuned):
    _, run_dir, result = tuned
    assert sorted(result["points"]) == ["fints", "steer"]
    assert len(result["points"]["steer"]) == 4 and len(result["points"]["fints"]) == 5  # 2x2 + one more temperature
    for algo, points in result["points"].items():
        assert result["chosen"][algo] == best(points)
        assert all(p["n_val"] == 3 for p in points)
    # Stage 04 extracted both grid layers in its one pass.
    assert read_json(run_dir / "vectors" / "manifest.json")["keys"] == [f"{s}.{layer}" for layer in (0, 1)
                                                                         for s in ("attn", "mlp")]
    gens = run_dir / "generations"
    top = result["chosen"]["fints"]
    expected = {f"{a}_val_attn+mlp_L{layer}_m{m}" + ("_k5_t0.1" if a == "fints" else "")
                for a in ("steer", "fints") for layer in (0, 1) for m in (0, 4)}
    expected.add(f"fints_val_attn+mlp_L{top['layer']}_m{top['multiplier']:g}_k5_t1")
    assert {p.name for p in (gens / "seen_val").iterdir()} == expected
    for split in ("seen_test", "seen_test_cluster2"):
        runs = sorted(p.name for p in (gens / split).iterdir())
        assert len(runs) == 4 and {"zeroshot", "rag"} <= set(runs)
        assert result["test"][split].keys() == {"steer", "fints"}


def test_ties_go_to_the_smaller_multiplier():
    points = [{"multiplier": 2.0, "val_score": 0.3}, {"multiplier": 0.5, "val_score": 0.3},
              {"multiplier": 1.0, "val_score": 0.2}]
    assert best(points)["multiplier"] == 0.5


def test_the_report_has_tables_intervals_settings_and_provenance(tuned):
    _, run_dir, _ = tuned
    text = (run_dir / "tune" / "report.md").read_text()
    for needle in ("## Settings chosen on validation", "## Test: seen_test", "## Test: seen_test_cluster2",
                   "| rag |", "| fints (tuned) |", "resampling users", "comparisons", "users better than rag",
                   "| seen_val |", "Pairs (stage 03)", "| 05_generate | 17 |", "Code: git ", "Packages: torch"):
        assert needle in text, needle
    assert (run_dir / "tune" / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert read_json(run_dir / "tune" / "tune.json")["val_split"] == "seen_val"


def test_scripts_report_writes_a_run_report_and_per_sample_lines(tuned):
    config, run_dir, _ = tuned
    path = run_stage("report", ["--config", str(config), "--splits", "seen_test", "--unit", "sample"])
    assert path == run_dir / "report.md" and "resampling samples" in path.read_text()
    rows = read_jsonl(run_dir / "generations" / "seen_test" / "rag" / "eval" / "per_sample.jsonl")
    scores = read_json(run_dir / "generations" / "seen_test" / "rag" / "eval" / "scores.json")
    assert rows == scores["per_sample"] and set(rows[0]) >= {"id", "user_id", "rougeL"}


def _scores(per_user_rows):
    per_sample = [{"id": f"{u}-{i}", "user_id": u, "rougeL": v} for u, vals in per_user_rows.items()
                  for i, v in enumerate(vals)]
    per_user = {u: {"rougeL": sum(v) / len(v)} for u, v in per_user_rows.items()}
    return {"per_sample": per_sample, "per_user": per_user}


def test_user_bootstrap_is_wider_than_sample_bootstrap_when_users_cluster():
    # Two users, each with many identical differences: the samples look like 40 independent
    # observations, but there are only two users, and they disagree.
    a = _scores({"u1": [0.0] * 20, "u2": [0.0] * 20})
    b = _scores({"u1": [0.2] * 20, "u2": [-0.1] * 20})
    users = bootstrap_diff(a, b, "rougeL", unit="user", n_boot=500)
    samples = bootstrap_diff(a, b, "rougeL", unit="sample", n_boot=500)
    assert users["diff"] == pytest.approx(0.05) == samples["diff"]
    assert users["units"] == 2 and samples["units"] == 40
    assert users["low"] == pytest.approx(-0.1) and users["high"] == pytest.approx(0.2)
    assert samples["half_width"] < users["half_width"]
    assert share_of_users_better(a, b, "rougeL") == 0.5


def test_user_bootstrap_of_a_per_type_metric_pairs_the_samples_of_that_type():
    # PersonalWAB scores facc per sample and reports facc_search over the search samples only
    rows = [("u1", "search", 1, 0), ("u1", "review", 0, 1), ("u2", "search", 0, 0), ("u2", "review", 1, 1)]
    a = {"per_sample": [{"id": f"{u}{t}", "user_id": u, "type": t, "facc": fa} for u, t, fa, _ in rows]}
    b = {"per_sample": [{"id": f"{u}{t}", "user_id": u, "type": t, "facc": fb} for u, t, _, fb in rows]}
    search = bootstrap_diff(a, b, "facc_search", unit="user", n_boot=200)
    assert search["diff"] == pytest.approx(-0.5) and search["n"] == 2 and search["units"] == 2
    assert bootstrap_diff(a, b, "facc", n_boot=200)["n"] == 4


def test_the_grid_reuses_the_configs_layers_and_sites_in_their_order_when_they_cover_it():
    assert covering(["attn", "mlp", "block"], {"attn", "mlp"}) == ["attn", "mlp", "block"]
    assert covering([15], {10, 15}) == [10, 15]


def test_the_multiplier_curve_puts_rag_at_zero_and_one_row_per_validation_point(tmp_path):
    from eval.curves import curve_table, plot_curves

    points = {"steer": [{"sites": "attn+mlp", "layer": 15, "multiplier": m, "val": {"rougeL": r}}
                        for m, r in ((2.0, 0.1), (1.0, 0.3))]}
    table = curve_table(points, ["rougeL"], {"rag": {"rougeL": 0.2}}).splitlines()
    assert table[2] == "| rag | - | - | 0 | 0.200 |"
    assert table[3:] == ["| steer | attn+mlp | 15 | 1 | 0.300 |", "| steer | attn+mlp | 15 | 2 | 0.100 |"]
    path = plot_curves(points, ["rougeL"], {"rag": {"rougeL": 0.2}}, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
