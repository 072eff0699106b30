"""Stage 06: metric values on hand-checked strings, per-user scores, bootstrap, reports."""

from __future__ import annotations

import json

import pytest

from data_process.artifact_io import read_json, write_json, write_jsonl
from eval import report
from eval.bootstrap import bootstrap_diff
from eval.metrics import meteor, meteor_available, rouge
from stages.evaluate import EvaluateConfig, evaluate_run

from .conftest import run_stage


def test_rouge_of_a_prefix_is_two_thirds_when_it_covers_half_the_reference():
    # 3 of 6 reference words, all 3 predicted words right: P=1, R=1/2, F=2/3.
    scores = rouge("the cat sat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_rouge_l_counts_the_longest_common_subsequence_not_bag_of_words():
    # Same four words, two swapped: unigram F=1, LCS=3 of 4 -> F=0.75.
    scores = rouge("alpha beta gamma delta", "alpha gamma beta delta")
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(0.75)


def test_rouge_stems_words_so_plurals_match():
    assert rouge("parsing files", "parse file")["rouge1"] == pytest.approx(1.0)


@pytest.mark.skipif(not meteor_available(), reason="WordNet not installed (scripts/setup.sh)")
def test_meteor_of_an_identical_sentence_is_one_minus_the_one_chunk_penalty():
    # 4 matches in 1 chunk: Fmean=1, penalty=0.5*(1/4)^3.
    assert meteor("tool for parsing files", "tool for parsing files") == pytest.approx(1 - 0.5 / 64)
    assert meteor("red green", "blue yellow") == pytest.approx(0.0)


def _records(gens: dict[str, tuple[str, str, str]]) -> list[dict]:
    return [{"id": i, "user_id": u, "algo": "x", "prompt": "p", "generation": g, "gold": gold}
            for i, (u, g, gold) in gens.items()]


def test_scores_average_samples_overall_and_per_user():
    records = _records({"a1": ("ua", "the cat sat", "the cat sat"),       # 1.0
                        "a2": ("ua", "dog", "the cat sat"),               # 0.0
                        "b1": ("ub", "the cat sat", "the cat sat on the mat")})  # 2/3
    scores = report.score_records(records)
    assert scores["n"] == 3 and scores["n_users"] == 2
    assert scores["per_user"]["ua"]["rougeL"] == pytest.approx(0.5)
    assert scores["per_user"]["ub"]["rougeL"] == pytest.approx(2 / 3)
    assert scores["overall"]["rougeL"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert scores["user_macro"]["rougeL"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert [r["id"] for r in scores["per_sample"]] == ["a1", "a2", "b1"]


def test_a_record_without_a_generation_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'x1'.*generation"):
        report.score_records([{"id": "x1", "user_id": "u", "gold": "g"}])


def _per_sample(values: list[float], users: int = 1) -> dict:
    return {"per_sample": [{"id": f"s{i}", "user_id": f"u{i % users}", "rougeL": v} for i, v in enumerate(values)]}


@pytest.mark.parametrize("unit", ["user", "sample"])
def test_bootstrap_of_a_constant_improvement_is_exactly_that_improvement(unit):
    a = [0.1, 0.5, 0.3, 0.9, 0.2]
    result = bootstrap_diff(_per_sample(a, 2), _per_sample([x + 0.1 for x in a], 2), "rougeL", unit=unit, n_boot=500)
    assert result["diff"] == pytest.approx(0.1) and result["unit"] == unit
    assert result["low"] == pytest.approx(0.1) and result["high"] == pytest.approx(0.1)
    assert result["p_le_0"] == 0.0


def test_bootstrap_interval_straddles_zero_when_gains_and_losses_cancel():
    a, b = _per_sample([0.5] * 40, 40), _per_sample([0.6, 0.4] * 20, 40)
    result = bootstrap_diff(a, b, "rougeL", n_boot=2000, seed=1)
    assert result["diff"] == pytest.approx(0.0)
    assert result["low"] < 0 < result["high"]


def test_bootstrap_is_seeded_and_refuses_runs_without_shared_samples_or_an_unknown_unit():
    a, b = _per_sample([0.0, 0.2, 0.4, 0.1], 2), _per_sample([0.3, 0.1, 0.5, 0.6], 2)
    assert bootstrap_diff(a, b, "rougeL", seed=3) == bootstrap_diff(a, b, "rougeL", seed=3)
    with pytest.raises(ValueError, match="share no sample"):
        bootstrap_diff(a, {"per_sample": [{"id": "other", "user_id": "u", "rougeL": 0.0}]}, "rougeL")
    with pytest.raises(ValueError, match="unknown bootstrap unit 'day'"):
        bootstrap_diff(a, b, "rougeL", unit="day")


def test_compare_pairs_samples_by_id_whatever_their_order():
    a = report.score_records(_records({"s1": ("u", "x", "the cat"), "s2": ("u", "y", "a dog")}))
    b = report.score_records(_records({"s2": ("u", "a dog", "a dog"), "s1": ("u", "the cat", "the cat")}))
    result = report.compare_scores(a, b, n_boot=200)
    assert result["rougeL"]["diff"] == pytest.approx(1.0)
    assert result["rougeL"]["low"] == pytest.approx(1.0)
    assert "B better" in report.format_comparison("a", "b", result)


def test_results_table_has_one_row_per_run_and_marks_missing_metrics():
    table = report.results_table({"rag": {"rouge1": 0.25, "rougeL": 0.2},
                                  "fints": {"rouge1": 0.3, "rougeL": 0.5, "meteor": 0.125}})
    lines = table.splitlines()
    assert lines[0] == "| run | ROUGE-1 | ROUGE-L | METEOR |"
    assert lines[2] == "| rag | 0.2500 | 0.2000 | n/a |"
    assert lines[3] == "| fints | 0.3000 | 0.5000 | 0.1250 |"


def test_sweep_plot_is_written_as_png(tmp_path):
    points = [{"layer": layer, "multiplier": m, "rougeL": 0.1 * m + layer} for layer in (1, 2) for m in (0, 1, 2)]
    path = report.plot_sweep(points, tmp_path / "sweep.png", baseline=0.2)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _finished_run(root, name: str, gens: dict) -> str:
    run = root / "generations" / "seen_test" / name
    write_jsonl(run / "generations.jsonl", _records(gens))
    write_json(run / "manifest.json", {"stage": "05_generate"})
    return str(run)


def test_stage_06_writes_scores_and_a_manifest_and_skips_when_done(tmp_path, caplog):
    _finished_run(tmp_path, "rag", {"s1": ("u1", "the cat sat", "the cat sat on the mat")})
    argv = ["--task", "lamp4", "--run-dir", str(tmp_path), "--algos", "zeroshot", "rag"]
    scores = run_stage("evaluate", argv)
    out = tmp_path / "generations" / "seen_test" / "rag" / "eval"
    stored = read_json(out / "scores.json")
    assert stored["overall"]["rougeL"] == pytest.approx(2 / 3)
    assert (out / "manifest.json").exists() and scores["rag"]["n"] == 1
    printed = caplog.text
    assert "not generated yet, skipped: ['zeroshot']" in printed and "| rag | 0.6667 | 0.6667 |" in printed
    assert (tmp_path / "generations" / "seen_test" / "results.png").exists()


def test_compare_prints_a_bootstrap_interval_per_metric(tmp_path, caplog):
    gens_a = {f"s{i}": ("u", "nothing", "the cat sat") for i in range(5)}
    gens_b = {f"s{i}": ("u", "the cat sat", "the cat sat") for i in range(5)}
    run_a, run_b = _finished_run(tmp_path, "rag", gens_a), _finished_run(tmp_path, "fints", gens_b)
    argv = ["--task", "lamp4", "--run-dir", str(tmp_path), "--compare", run_a, run_b, "--n-boot", "100"]
    run_stage("evaluate", argv)
    printed = caplog.text
    assert "fints - rag" in printed and "ROUGE-L  +1.0000  95% CI [+1.0000, +1.0000]  B better" in printed
    saved = json.loads((tmp_path / "generations/seen_test/fints/eval/compare_vs_rag.json").read_text())
    assert saved["bootstrap"]["rouge1"]["diff"] == pytest.approx(1.0)


def test_evaluating_an_unfinished_generation_says_to_run_stage_05(tmp_path):
    run = tmp_path / "generations" / "seen_test" / "rag"
    write_jsonl(run / "generations.jsonl", _records({"s1": ("u", "a", "b")}))
    with pytest.raises(FileNotFoundError, match="05_generate"):
        evaluate_run(run, EvaluateConfig(task="lamp4"))


def test_without_wordnet_meteor_is_left_out_and_the_reason_recorded(monkeypatch):
    import eval.metrics

    monkeypatch.setattr(eval.metrics, "meteor_available", lambda: False)
    monkeypatch.setattr(report, "meteor_available", lambda: False)
    scores = report.score_records(_records({"s1": ("u", "the cat sat", "the cat sat")}))
    assert scores["metrics"] == ["rouge1", "rougeL"] and "meteor" not in scores["overall"]
    assert "WordNet" in scores["meteor_unavailable"]


def test_the_run_report_gives_every_run_a_bootstrap_interval_against_rag(tmp_path, caplog):
    golds = {f"s{i}": ("u", "the cat sat") for i in range(6)}
    _finished_run(tmp_path, "rag", {i: (u, "nothing", g) for i, (u, g) in golds.items()})
    _finished_run(tmp_path, "oppu", {i: (u, g, g) for i, (u, g) in golds.items()})  # right every time
    _finished_run(tmp_path, "oppu+fints", {i: (u, "nothing" if i < "s3" else g, g) for i, (u, g) in golds.items()})
    run_stage("evaluate", ["--task", "lamp4", "--run-dir", str(tmp_path), "--n-boot", "200"])
    report_md = (tmp_path / "generations" / "seen_test" / "results.md").read_text()
    assert "Paired bootstrap 95% intervals against rag, resampling users (6 samples, 1 users, 200 resamples" \
        in report_md
    assert "| oppu | +1.0000 [+1.0000, +1.0000] * |" in report_md
    row = next(line for line in report_md.splitlines() if line.startswith("| oppu+fints | +0.5000 ["))
    assert row.count("[") == 3 and "| rag |" not in report_md.split("intervals")[1]
    assert "| oppu | +1.0000 [+1.0000, +1.0000] * |" in caplog.text


def _interval_cells(line: str) -> list[tuple[float, float, float]]:
    """Every ``+d [+lo, +hi]`` cell of a Markdown table row, as numbers."""
    import re

    return [tuple(map(float, m)) for m in re.findall(r"([+-]\d\.\d+) \[([+-]\d\.\d+), ([+-]\d\.\d+)\]", line)]


@pytest.mark.parametrize("unit", ["user", "sample"])
def test_stage_06_and_the_run_report_print_the_same_interval_for_the_same_unit(tmp_path, unit):
    # Users disagree (two gain everything, one a little, one loses), so resampling users and
    # resampling samples give clearly different intervals: the two files must pick the same.
    right = {"u1": 5, "u2": 5, "u3": 2, "u4": 0}
    golds = {f"{u}-{i}": (u, "the cat sat") for u in right for i in range(5)}
    _finished_run(tmp_path, "rag", {i: (u, g if u == "u4" else "nothing", g) for i, (u, g) in golds.items()})
    _finished_run(tmp_path, "fints", {i: (u, g if int(i[-1]) < right[u] else "nothing", g)
                                      for i, (u, g) in golds.items()})
    common = ["--task", "lamp4", "--run-dir", str(tmp_path), "--n-boot", "300", "--unit", unit]
    run_stage("evaluate", common + ["--algos", "rag", "fints"])
    run_stage("report", common)
    results = (tmp_path / "generations" / "seen_test" / "results.md").read_text()
    assert f"resampling {unit}s" in results
    row_06 = next(line for line in results.splitlines() if line.startswith("| fints | ") and "[" in line)
    report_md = (tmp_path / "report.md").read_text()
    row_report = next(line for line in report_md.splitlines() if line.startswith("| fints | ") and "[" in line)
    ours, theirs = _interval_cells(row_06), _interval_cells(row_report)
    assert len(ours) == len(theirs) >= 2
    for cell_06, cell_report in zip(ours, theirs, strict=True):  # 06 prints four decimals, report.md three
        assert cell_06 == pytest.approx(cell_report, abs=6e-4)
