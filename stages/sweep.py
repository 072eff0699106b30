"""Sweep fints over layers x multipliers: a table and a plot of ROUGE-L vs multiplier.

Each point is one stage-05 run (``--algo fints``, every site of the layer scaled by the
multiplier) saved as {run_dir}/generations/{split}/fints_sweep_L{layer}_m{mult}/ and scored
by stage 06; finished points are reused.  Writes {run_dir}/sweep/{split}/sweep.{md,json,png}.
Defaults come from the config's "generate" section, then its "sweep" section, then flags.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields, replace

from data_process.artifact_io import write_json
from data_process.config import stage_dir
from eval import report
from stages.common import task_of, with_task_defaults
from stages.evaluate import evaluate_run
from stages.generate import GenerateConfig, gen_dir
from stages.generate import run as generate
from steering.loading import load_model

log = logging.getLogger(__name__)


@dataclass
class SweepConfig(GenerateConfig):
    STAGE = "sweep"
    SECTIONS = ("prompt", "decoding", "generate", "sweep")

    sweep_layers: list[int] = field(default_factory=lambda: [15],
                                    metadata={"min": 0, "non_empty": True, "help": "layers to try, one at a time"})
    sweep_multipliers: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0],
                                           metadata={"non_empty": True, "help": "multipliers to try at each layer"})


def run(cfg: SweepConfig) -> list[dict]:
    """Generate and score every point; return the points' scores."""
    cfg = with_task_defaults(cfg)
    task = task_of(cfg)
    model, tok = load_model(cfg.model, cfg.device, cfg.dtype, layers_attr=cfg.layers_attr)
    base = GenerateConfig(**{f.name: getattr(cfg, f.name) for f in fields(GenerateConfig)})
    points = []
    for layer in cfg.sweep_layers:
        for mult in cfg.sweep_multipliers:
            point = replace(base, algo="fints", layers=[layer], multipliers=[mult], eval=False,
                            tag=f"{cfg.tag}_sweep_L{layer}_m{mult:g}")
            generate(point, model, tok)
            scores = evaluate_run(gen_dir(point), point)
            points.append({"layer": layer, "multiplier": mult, "n": scores["n"], **scores["overall"]})
    rag_dir = gen_dir(replace(base, algo="rag"))
    baseline = None
    if (rag_dir / "eval" / "scores.json").exists() and not cfg.limit:
        baseline = evaluate_run(rag_dir, base)["overall"]["rougeL"]
    out = stage_dir(cfg.run_dir, "sweep") / cfg.split
    rows = {f"L{p['layer']} x{p['multiplier']:g}": p for p in points}
    table = report.results_table(rows, metrics=task.metrics)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(table + "\n", encoding="utf-8")
    write_json(out / "sweep.json", {"config": asdict(cfg), "points": points, "rag_rougeL": baseline})
    report.plot_sweep(points, out / "sweep.png", baseline=baseline)
    log.info("\nfints sweep on %s:\n%s\n(plot: %s)", cfg.split, table, out / "sweep.png")
    return points
