"""The run report: one Markdown file a reader can trust on its own (see eval/run_report.py).

Writes {run_dir}/report.md: data statistics (01), pairs kept/dropped (03), seconds per
stage, per test split the results table with each row's settings and every method
against rag (95% bootstrap intervals resampling users; ``--unit sample`` resamples
samples), the difference the data can detect, how many comparisons were made, the share
of users each method helps, the git commit (dirty flag) and package versions.  Runs
not yet scored are scored first (stage 06).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_process.artifact_io import MANIFEST, read_json
from data_process.config import stage_dir
from eval import run_report
from stages.common import StageConfig, task_of
from stages.evaluate import evaluate_run

log = logging.getLogger(__name__)


@dataclass
class ReportConfig(StageConfig):
    STAGE = "report"
    SECTIONS = ("report",)

    splits: list[str] = field(default_factory=list,
                              metadata={"name": True, "help": "test splits to report (default: every generated one)"})
    baseline: str = field(default="rag", metadata={"help": "run every other method is compared with"})
    unit: str = field(default="user", metadata={"help": "what the bootstrap resamples", "choices": ["user", "sample"]})
    n_boot: int = field(default=2000, metadata={"min": 1, "help": "bootstrap resamples"})
    output: str = field(default="", metadata={"help": "report file (default {run_dir}/report.md)"})


def finished_runs(run_dir: str | Path, split: str) -> dict[str, Path]:
    """Run name -> directory of every finished generation run of ``split``."""
    base = stage_dir(run_dir, "generations") / split
    return {d.name: d for d in sorted(base.iterdir()) if (d / MANIFEST).exists()} if base.is_dir() else {}


def split_section(cfg: Any, split: str, runs: dict[str, Path], *, unit: str, n_boot: int,
                  baseline: str = "rag", title: str = "") -> list[str]:
    """Markdown lines of one split: scores, settings, intervals against ``baseline``."""
    task = task_of(cfg)
    scores = {name: evaluate_run(d, cfg) for name, d in runs.items()}
    settings = {name: run_report.describe_settings(read_json(d / MANIFEST)) for name, d in runs.items()}
    metrics = [m for m in task.metrics if all(m in s["overall"] for s in scores.values())]
    return [f"## {title or split}", "", *run_report.results_section(
        scores, settings, metrics, baseline=baseline, unit=unit, n_boot=n_boot, seed=cfg.seed), ""]


def write_report(path: Path, title: str, body: list[str], run_dir: str | Path) -> Path:
    """``body`` framed by the run's data section and provenance, written to ``path``."""
    lines = [f"# {title}", "", *body, "## Data and time", "", *run_report.data_section(Path(run_dir)), "",
             "## Provenance", "", *run_report.provenance_section(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    log.info("report -> %s", path)
    return path


def run(cfg: ReportConfig) -> Path:
    """Write the report of ``cfg.run_dir``; return its path."""
    task = task_of(cfg)
    gen_root = stage_dir(cfg.run_dir, "generations")
    splits = cfg.splits or (sorted(p.name for p in gen_root.iterdir() if p.is_dir()) if gen_root.is_dir() else [])
    body = []
    for split in splits:
        runs = finished_runs(cfg.run_dir, split)
        if runs:
            body += split_section(cfg, split, runs, unit=cfg.unit, n_boot=cfg.n_boot, baseline=cfg.baseline)
    if not body:
        raise FileNotFoundError(f"no finished generation runs under {gen_root}: run scripts/05_generate first")
    out = Path(cfg.output) if cfg.output else Path(cfg.run_dir) / "report.md"
    return write_report(out, f"{task.summary}: {cfg.run_dir}", body, cfg.run_dir)
