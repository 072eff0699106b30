"""Stage 06: score generation runs with the task's metrics; compare two runs.

Writes {run_dir}/generations/{split}/{algo}{tag}/eval/scores.json (overall, per user, per
sample), per_sample.jsonl (one line per sample: id, user_id, metrics) and a manifest,
then logs a results table and every run's paired bootstrap 95% interval against
``--baseline`` (rag), both also written to results{tag}.md, and a bar chart.
``--compare RUN_A RUN_B`` gives the paired bootstrap 95% interval of B - A per metric.
The bootstrap resamples users (``--unit sample``: samples) with the same function as
report.md (:mod:`eval.bootstrap`), so both files print the same interval.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_process.artifact_io import read_finished_jsonl, read_json, run_relative, write_json, write_jsonl
from data_process.config import stage_dir
from data_process.stage import Stage
from eval import report
from eval.bootstrap import UNITS
from stages.common import StageConfig, task_of

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig(StageConfig):
    STAGE = "06_evaluate"
    SECTIONS = ("evaluate",)

    algos: list[str] = field(default_factory=lambda: ["zeroshot", "rag", "steer", "fints", "oppu", "oppu+fints"],
                             metadata={"help": "runs {algo}{tag} of --split to score (missing runs are skipped)"})
    split: str = field(default="seen_test", metadata={"name": True, "help": "test split the runs generated"})
    tag: str = field(default="", metadata={"name": True, "help": "suffix of the run directories"})
    gen_dirs: list[str] = field(default_factory=list, metadata={"help": "explicit run directories (override --algos)"})
    compare: list[str] = field(default_factory=list, metadata={"help": "RUN_A RUN_B: paired bootstrap of B - A"})
    n_boot: int = field(default=2000, metadata={"min": 1, "help": "bootstrap resamples"})
    unit: str = field(default="user", metadata={"help": "what the bootstrap resamples (as in report.md)",
                                                "choices": list(UNITS)})
    baseline: str = field(default="rag", metadata={"help": "algorithm the other runs get paired bootstrap "
                                                           "intervals against ('' for none)"})
    plot: bool = field(default=True, metadata={"help": "write a bar chart of the table (PNG)"})


def evaluate_run(gen_dir: str | Path, cfg: Any, *, overwrite: bool = False) -> dict[str, Any]:
    """Score ``gen_dir/generations.jsonl`` with ``cfg``'s task into ``gen_dir/eval/scores.json``.

    Skipped (the stored scores returned) when the evaluation already finished.  The run
    directory is ``gen_dir``'s grandparent's parent (``{run_dir}/generations/{split}/{run}``),
    where task environments (PersonalWAB's search index and recommender) live.
    """
    task = task_of(cfg)
    gen_dir = Path(gen_dir)
    source = gen_dir / "generations.jsonl"
    if not (gen_dir / "manifest.json").exists():
        raise FileNotFoundError(f"{gen_dir}: generation has not finished (no manifest.json); "
                                "run scripts/05_generate first")
    # Scores are a function of the generations and the task only: a changed generations
    # file (the run was redone) makes them stale, and they are recomputed.
    stage = Stage(EvaluateConfig.STAGE, gen_dir / "eval", asdict(cfg), overwrite=overwrite, inputs=[source],
                  settings={"task": task.name}, redo_changed=True)
    if stage.done:
        return read_json(stage.out_dir / "scores.json")
    records = read_finished_jsonl(source)
    if not records:
        raise ValueError(f"{source}: no generation records to evaluate")
    scores = {"task": task.name, **task.evaluate(records, data_dir=cfg.data_dir, run_dir=gen_dir.parents[2])}
    scores["algo"] = records[0].get("algo")
    out = stage.start() / "scores.json"
    write_json(out, scores)
    # One line per sample (id, user, metrics): results can be joined and re-analysed.
    samples = stage.out_dir / "per_sample.jsonl"
    write_jsonl(samples, scores.get("per_sample", []))
    stage.finish(outputs=[out, samples], n=len(records), meteor_unavailable=scores.get("meteor_unavailable"))
    return scores


def _runs(cfg: EvaluateConfig) -> dict[str, Path]:
    if cfg.gen_dirs:
        return {Path(d).name: Path(d) for d in cfg.gen_dirs}
    base = stage_dir(cfg.run_dir, "generations") / cfg.split
    runs = {f"{a}{cfg.tag}": base / f"{a}{cfg.tag}" for a in cfg.algos}
    missing = [n for n, d in runs.items() if not (d / "manifest.json").exists()]
    if missing:
        log.info("[06_evaluate] not generated yet, skipped: %s", missing)
    return {n: d for n, d in runs.items() if n not in missing}


def compare(cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    """Paired bootstrap of run B - run A (``--compare A B``), logged and saved next to B."""
    if len(cfg.compare) != 2:
        raise ValueError(f"--compare takes two run directories, got {len(cfg.compare)}")
    a, b = (Path(p) for p in cfg.compare)
    scores_a, scores_b = (evaluate_run(d, cfg, overwrite=cfg.overwrite) for d in (a, b))
    result = report.compare_scores(scores_a, scores_b, unit=cfg.unit, n_boot=cfg.n_boot, seed=cfg.seed)
    log.info(report.format_comparison(a.name, b.name, result))
    where = {"a": run_relative(a, cfg.run_dir), "b": run_relative(b, cfg.run_dir)}
    write_json(b / "eval" / f"compare_vs_{a.name}.json", {**where, "bootstrap": result})
    return result


def _intervals(cfg: EvaluateConfig, scores: dict[str, dict], metrics) -> str:
    """Every run's paired bootstrap interval against the baseline run ('' without one)."""
    base = f"{cfg.baseline}{cfg.tag}"
    if not cfg.baseline or base not in scores or len(scores) < 2:
        return ""
    intervals = report.intervals_vs(scores, base, metrics, unit=cfg.unit, n_boot=cfg.n_boot, seed=cfg.seed)
    first = next((r for by_metric in intervals.values() for r in by_metric.values()), {"n": 0, "units": 0})
    return (f"Paired bootstrap 95% intervals against {base}, resampling {cfg.unit}s ({first['n']} samples, "
            f"{first['units']} {cfg.unit}s, {cfg.n_boot} resamples; * = the interval excludes 0):\n\n"
            + report.interval_table(intervals, metrics))


def run(cfg: EvaluateConfig) -> dict[str, dict]:
    """Score every finished run of the split (or compare two); return the scores by run name."""
    task = task_of(cfg)
    if cfg.compare:
        compare(cfg)
        return {}
    runs = _runs(cfg)
    if not runs:
        raise FileNotFoundError(f"no finished generation runs to evaluate under {cfg.run_dir} (split {cfg.split})")
    scores = {name: evaluate_run(run_dir, cfg, overwrite=cfg.overwrite) for name, run_dir in runs.items()}
    if any("meteor_unavailable" in s for s in scores.values()):
        log.warning("[06_evaluate] METEOR unavailable (WordNet not found; run scripts/setup.sh): reporting the rest")
    rows = {name: s["overall"] for name, s in scores.items()}
    n = {name: {"n": str(s["n"]), "users": str(s["n_users"])} for name, s in scores.items()}
    for name, s in scores.items():
        if "parse_failures" in s:  # tasks whose answers are parsed (PersonalWAB calls)
            n[name]["unparsed"] = str(s["parse_failures"].get("total", 0))
    table = report.results_table(rows, metrics=task.metrics, extra=n)
    failures = {name: s["parse_failures"] for name, s in scores.items() if s.get("parse_failures", {}).get("total")}
    if failures:
        table += "\n\nUnparseable answers by reason: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
    log.info("\nResults on %s (%s):\n%s\n", cfg.split, task.name, table)
    intervals = _intervals(cfg, scores, task.metrics)
    if intervals:
        log.info("\n%s\n", intervals)
    out = stage_dir(cfg.run_dir, "generations") / cfg.split
    (out / f"results{cfg.tag}.md").write_text(table + "\n" + (f"\n{intervals}\n" if intervals else ""),
                                              encoding="utf-8")
    if cfg.plot:
        report.plot_runs(rows, out / f"results{cfg.tag}.png", metrics=task.metrics)
    return scores
