"""Stage 06: score generation runs (ROUGE-1, ROUGE-L, METEOR; PersonalWAB accuracies).

    python -m scripts.06_evaluate --config configs/lamp4.json --algos zeroshot rag steer fints
    python -m scripts.06_evaluate --config configs/lamp4.json --compare \
        runs/lamp4/generations/seen_test/rag runs/lamp4/generations/seen_test/fints

Writes {run_dir}/generations/{split}/{algo}{tag}/eval/scores.json (overall, per user, per
sample) and a manifest, then prints a results table.  ``--compare RUN_A RUN_B`` prints the
paired bootstrap 95% interval of B - A per metric.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_process.artifacts import write_json
from data_process.config import CommonConfig, parse_config, stage_dir
from eval import report


@dataclass
class EvaluateConfig(CommonConfig):
    algos: list[str] = field(default_factory=lambda: ["zeroshot", "rag", "steer", "fints"],
                             metadata={"help": "runs {algo}{tag} of --split to score (missing runs are skipped)"})
    split: str = field(default="seen_test", metadata={"help": "test split the runs generated"})
    tag: str = field(default="", metadata={"help": "suffix of the run directories"})
    gen_dirs: list[str] = field(default_factory=list, metadata={"help": "explicit run directories (override --algos)"})
    compare: list[str] = field(default_factory=list, metadata={"help": "RUN_A RUN_B: paired bootstrap of B - A"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})
    pwab_cache_dir: str = field(default="", metadata={"help": "PersonalWAB: cache of the tool environment"})
    plot: bool = field(default=True, metadata={"help": "write a bar chart of the table (PNG)"})


def _runs(cfg: EvaluateConfig) -> dict[str, Path]:
    if cfg.gen_dirs:
        return {Path(d).name: Path(d) for d in cfg.gen_dirs}
    base = stage_dir(cfg.run_dir, "generations") / cfg.split
    runs = {f"{a}{cfg.tag}": base / f"{a}{cfg.tag}" for a in cfg.algos}
    missing = [n for n, d in runs.items() if not (d / "manifest.json").exists()]
    if missing:
        print(f"[06_evaluate] not generated yet, skipped: {missing}")
    return {n: d for n, d in runs.items() if n not in missing}


def _score(cfg: EvaluateConfig, run: Path) -> dict:
    return report.evaluate_run(run, task=cfg.task, config=asdict(cfg), data_dir=cfg.data_dir,
                               cache_dir=cfg.pwab_cache_dir, overwrite=cfg.overwrite)


def compare(cfg: EvaluateConfig) -> None:
    if len(cfg.compare) != 2:
        raise ValueError(f"--compare takes two run directories, got {len(cfg.compare)}")
    a, b = (Path(p) for p in cfg.compare)
    result = report.compare_scores(_score(cfg, a), _score(cfg, b), n_boot=cfg.n_boot, seed=cfg.seed)
    print(report.format_comparison(a.name, b.name, result))
    write_json(b / "eval" / f"compare_vs_{a.name}.json", {"a": str(a), "b": str(b), "bootstrap": result})


def main(cfg: EvaluateConfig) -> dict[str, dict]:
    if cfg.compare:
        compare(cfg)
        return {}
    runs = _runs(cfg)
    if not runs:
        raise FileNotFoundError(f"no finished generation runs to evaluate under {cfg.run_dir} (split {cfg.split})")
    scores = {name: _score(cfg, run) for name, run in runs.items()}
    if cfg.task == "pwab":
        from eval.pwab_eval import PWAB_METRICS

        rows = {name: s["overall"] for name, s in scores.items()}
        print(f"\nResults on {cfg.split} (pwab):\n{report.results_table(rows, metrics=PWAB_METRICS)}\n")
        return scores
    if any("meteor_unavailable" in s for s in scores.values()):
        print("[06_evaluate] METEOR unavailable (WordNet not found; run scripts/setup.sh): reporting ROUGE only")
    rows = {name: s["overall"] for name, s in scores.items()}
    n = {name: {"n": str(s["n"]), "users": str(s["n_users"])} for name, s in scores.items()}
    table = report.results_table(rows, extra=n)
    print(f"\nResults on {cfg.split} ({cfg.task}):\n{table}\n")
    out = stage_dir(cfg.run_dir, "generations") / cfg.split
    (out / f"results{cfg.tag}.md").write_text(table + "\n", encoding="utf-8")
    if cfg.plot:
        report.plot_runs(rows, out / f"results{cfg.tag}.png")
    return scores


if __name__ == "__main__":
    main(parse_config(EvaluateConfig, "evaluate"))
