"""Sweep fints over layers x multipliers: a table and a plot of ROUGE-L vs multiplier.

    python -m scripts.sweep --config configs/lamp4.json --sweep-layers 10 15 20 \
        --sweep-multipliers 0 0.5 1 2 4 --limit 40

Each point is one stage-05 run (``--algo fints``, every site of the layer scaled by the
multiplier) saved as {run_dir}/generations/{split}/fints_sweep_L{layer}_m{mult}/ and scored
by stage 06; finished points are reused.  Writes {run_dir}/sweep/{split}/sweep.{md,json,png}.
Defaults come from the config's "generate" section, then its "sweep" section, then flags.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field, replace

from transformers import HfArgumentParser

from data_process.artifacts import write_json
from data_process.config import config_defaults, stage_dir
from eval import report
from steering.runner import GenerateConfig, gen_dir, run_generation


@dataclass
class SweepConfig(GenerateConfig):
    sweep_layers: list[int] = field(default_factory=lambda: [15], metadata={"help": "layers to try, one at a time"})
    sweep_multipliers: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0],
                                           metadata={"help": "multipliers to try at each layer"})


def parse(argv: list[str] | None = None) -> SweepConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--config", default="")
    path = peek.parse_known_args(argv)[0].config
    parser = HfArgumentParser(SweepConfig)
    if path:  # generate section first, so the sweep section and flags override it
        parser.set_defaults(**config_defaults(path, SweepConfig, "generate"))
        parser.set_defaults(**config_defaults(path, SweepConfig, "sweep"))
    return parser.parse_args_into_dataclasses(args=argv)[0]


def main(cfg: SweepConfig) -> list[dict]:
    from steering.model import load_model

    model, tok = load_model(cfg.model, cfg.device, cfg.dtype)
    base = GenerateConfig(**{k: v for k, v in asdict(cfg).items() if not k.startswith("sweep_")})
    points = []
    for layer in cfg.sweep_layers:
        for mult in cfg.sweep_multipliers:
            point = replace(base, algo="fints", layers=[layer], multipliers=[mult], eval=True,
                            tag=f"{cfg.tag}_sweep_L{layer}_m{mult:g}")
            run_generation(point, model, tok)
            scores = report.evaluate_run(gen_dir(point), task=cfg.task, config=asdict(point))
            points.append({"layer": layer, "multiplier": mult, "n": scores["n"], **scores["overall"]})
    rag_dir = gen_dir(replace(base, algo="rag"))
    baseline = None
    if (rag_dir / "eval" / "scores.json").exists() and not cfg.limit:
        baseline = report.evaluate_run(rag_dir, task=cfg.task, config=asdict(base))["overall"]["rougeL"]
    out = stage_dir(cfg.run_dir, "sweep") / cfg.split
    rows = {f"L{p['layer']} x{p['multiplier']:g}": p for p in points}
    table = report.results_table(rows)
    (out / "sweep.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text(table + "\n", encoding="utf-8")
    write_json(out / "sweep.json", {"config": asdict(cfg), "points": points, "rag_rougeL": baseline})
    report.plot_sweep(points, out / "sweep.png", baseline=baseline)
    print(f"\nfints sweep on {cfg.split}:\n{table}\n(plot: {out / 'sweep.png'})")
    return points


if __name__ == "__main__":
    main(parse())
