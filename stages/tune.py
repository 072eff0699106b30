"""Tune steer and fints on the validation users' data, then test each method once.

1. Stage 04 extracts every layer (and site) of the grid in its one pass.
2. On ``--val-split`` (stage 01's ``seen_val``: each seen user's latest training
   question, never used for pairs or vectors) every grid point runs as a stage-05 run
   ``{algo}{tag}_val_{point}`` and is scored: steer over sites x layers x multipliers;
   fints over the same, then top-K x softmax temperature at its best layer and
   multiplier (a coordinate search: the full product would cost K x T times more).
3. Each method's best point by the task's selection metric (ROUGE-L; PersonalWAB: RACC;
   ties: the smaller multiplier, then grid order) runs once on every test split present
   (``--test-splits``), beside zeroshot and rag.
4. Writes {run_dir}/tune/tune.json (every point), tune.png (validation score vs
   multiplier per layer, the chosen settings' test score marked) and report.md (the
   test tables with user-level intervals against rag).

Finished points are reused; a point whose settings changed is refused by its fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from data_process.artifact_io import write_json
from data_process.config import parse_config, stage_dir
from eval.report import METRIC_NAMES, save_figure
from stages.common import task_of, with_task_defaults
from stages.evaluate import evaluate_run
from stages.extract_vectors import ExtractConfig
from stages.extract_vectors import run as extract
from stages.generate import GenerateConfig, gen_dir
from stages.generate import run as generate
from stages.report import split_section, write_report
from stages.workers import ray_session
from steering.loading import load_model

log = logging.getLogger(__name__)

SITE_SETS = {"attn+mlp": ["attn", "mlp"], "block": ["block"]}


@dataclass
class TuneConfig(GenerateConfig):
    STAGE = "tune"
    SECTIONS = ("prompt", "decoding", "generate", "tune")

    tune_layers: list[int] = field(default_factory=lambda: [10, 15, 20],
                                   metadata={"min": 0, "non_empty": True, "help": "layers tried, one at a time"})
    tune_multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0],
                                          metadata={"non_empty": True, "help": "multipliers tried at each layer"})
    tune_top_pairs: list[int] = field(default_factory=lambda: [5],
                                      metadata={"min": 1, "non_empty": True, "help": "fints: top-K pairs tried"})
    tune_temperatures: list[float] = field(default_factory=lambda: [0.1], metadata={
        "gt": 0, "non_empty": True, "help": "fints: softmax temperatures tried"})
    tune_sites: list[str] = field(default_factory=lambda: ["attn+mlp"],
                                  metadata={"non_empty": True, "help": "site sets tried", "choices": list(SITE_SETS)})
    val_split: str = field(default="seen_val", metadata={"name": True, "help": "split the settings are chosen on"})
    test_splits: list[str] = field(default_factory=lambda: ["seen_test", "seen_test_cluster2"],
                                   metadata={"name": True, "non_empty": True,
                                             "help": "splits the tuned methods are tested on (missing ones skipped)"})
    n_boot: int = field(default=2000, metadata={"min": 1, "help": "bootstrap resamples of the report"})


def _point_tag(point: dict[str, Any]) -> str:
    tag = f"_{point['sites']}_L{point['layer']}_m{point['multiplier']:g}"
    return tag + (f"_k{point['top_pairs']}_t{point['temperature']:g}" if point["algo"] == "fints" else "")


def _point_cfg(base: GenerateConfig, point: dict[str, Any], split: str, tag: str) -> GenerateConfig:
    extra = ({"top_pairs": point["top_pairs"], "softmax_temperature": point["temperature"]}
             if point["algo"] == "fints" else {})
    return replace(base, algo=point["algo"], split=split, layers=[point["layer"]], sites=SITE_SETS[point["sites"]],
                   multipliers=[point["multiplier"]], tag=f"{base.tag}{tag}", eval=False, **extra)


def _score(cfg: GenerateConfig, model, tok) -> dict[str, Any]:
    generate(cfg, model, tok)
    return evaluate_run(gen_dir(cfg), cfg)


def best(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Highest validation score (the task's selection metric); ties go to the smaller
    multiplier, then the earlier point."""
    return max(enumerate(points), key=lambda ip: (ip[1]["val_score"], -ip[1]["multiplier"], -ip[0]))[1]


def _grid(cfg: TuneConfig, base: GenerateConfig, model, tok, metric: str) -> dict[str, list[dict[str, Any]]]:
    """Every validation point of steer and fints, scored by ``metric``."""
    def run_points(points):
        for p in points:
            scores = _score(_point_cfg(base, p, cfg.val_split, "_val" + _point_tag(p)), model, tok)
            p.update(val_score=scores["overall"][metric], val=scores["overall"], n_val=scores["n"])
            log.info("[tune] %s %s: validation %s %.4f", p["algo"], _point_tag(p), metric, p["val_score"])
        return points

    k0, t0 = cfg.tune_top_pairs[0], cfg.tune_temperatures[0]
    layer_grid = [{"sites": s, "layer": layer, "multiplier": m} for s in cfg.tune_sites
                  for layer in cfg.tune_layers for m in cfg.tune_multipliers]
    steer = run_points([{"algo": "steer", **p} for p in layer_grid])
    fints = run_points([{"algo": "fints", **p, "top_pairs": k0, "temperature": t0} for p in layer_grid])
    top = best(fints)
    best_layer = {k: top[k] for k in ("algo", "sites", "layer", "multiplier")}
    fints += run_points([{**best_layer, "top_pairs": k, "temperature": t}
                         for k in cfg.tune_top_pairs for t in cfg.tune_temperatures if (k, t) != (k0, t0)])
    return {"steer": steer, "fints": fints}


def covering(own: list, needed: set) -> list:
    """The config's own layers or sites as it lists them when they cover what the grid
    needs (so a run.sh run over the same config agrees: a reordered list is other
    settings to stage 04), else the sorted union."""
    return own if needed <= set(own) else sorted(needed | set(own))


def _extract_grid_layers(cfg: TuneConfig) -> None:
    """Stage 04 with every layer and site the grid needs, in one pass."""
    argv = ["--config", cfg.config] if cfg.config else []
    ecfg = parse_config(ExtractConfig, argv)
    sites = covering(ecfg.sites, {s for name in cfg.tune_sites for s in SITE_SETS[name]})
    layers = covering(ecfg.layers, set(cfg.tune_layers))
    common = {f.name: getattr(cfg, f.name) for f in fields(ExtractConfig) if f.name in
              ("task", "run_dir", "model", "device", "dtype", "seed", "layers_attr", "overwrite")}
    extract(replace(ecfg, **common, layers=layers, sites=sites))


def run(cfg: TuneConfig) -> dict[str, Any]:
    """Tune on the validation split, test once, write the report; return tune.json's content."""
    cfg = with_task_defaults(cfg)
    task = task_of(cfg)
    _extract_grid_layers(cfg)
    model, tok = load_model(cfg.model, cfg.device, cfg.dtype, layers_attr=cfg.layers_attr)
    base = GenerateConfig(**{f.name: getattr(cfg, f.name) for f in fields(GenerateConfig)})
    metric = task.selection_metric
    ranked = stage_dir(cfg.run_dir, "ranked")
    body, tests = [], {}
    with ray_session(cfg):  # every point's stage-05 run on the same Ray
        grid = _grid(cfg, base, model, tok, metric)
        chosen = {algo: best(points) for algo, points in grid.items()}
        for split in [s for s in cfg.test_splits if (ranked / f"{s}.jsonl").exists()]:
            runs = {name: gen_dir(replace(base, algo=name, split=split)) for name in ("zeroshot", "rag")}
            for name in runs:
                _score(replace(base, algo=name, split=split, eval=False), model, tok)
            for algo, point in chosen.items():
                pcfg = _point_cfg(base, point, split, _point_tag(point))
                tests.setdefault(split, {})[algo] = _score(pcfg, model, tok)["overall"]
                runs[f"{algo} (tuned)"] = gen_dir(pcfg)
            body += split_section(cfg, split, runs, unit="user", n_boot=cfg.n_boot, title=f"Test: {split}")
    out = stage_dir(cfg.run_dir, "tune")
    result = {"val_split": cfg.val_split, "metric": metric, "chosen": chosen, "test": tests, "points": grid}
    write_json(out / "tune.json", result)
    plot_tune(grid, tests.get(cfg.test_splits[0], {}), chosen, out / "tune.png", metric)
    name = METRIC_NAMES.get(metric, metric)
    settings = [f"- **{algo}**: sites {p['sites']}, layer {p['layer']}, multiplier {p['multiplier']:g}"
                + (f", top-K {p['top_pairs']}, temperature {p['temperature']:g}" if algo == "fints" else "")
                + f" (validation {name} {p['val_score']:.4f} on {p['n_val']} samples)" for algo, p in chosen.items()]
    n_points = sum(len(v) for v in grid.values())
    body = ["## Settings chosen on validation", "", f"{n_points} points on `{cfg.val_split}`; selection by {name} "
            "(ties: the smaller multiplier). Test splits were run once, with these settings.", "",
            *settings, "", *body]
    write_report(out / "report.md", f"{task.summary}: tuned on {cfg.val_split}", body, cfg.run_dir)
    return result


def plot_tune(grid: dict[str, list[dict]], test: dict[str, dict], chosen: dict[str, dict], path: Path,
              metric: str = "rougeL") -> Path:
    """Validation score vs multiplier, one line per method and layer; chosen test scores as stars."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grid), figsize=(5 * len(grid), 4), squeeze=False)
    for ax, (algo, points) in zip(axes[0], grid.items(), strict=True):
        top = chosen[algo]
        # fints lines: the chosen top-K and temperature only (steer points have neither)
        alike = [p for p in points
                 if p.get("top_pairs") == top.get("top_pairs") and p.get("temperature") == top.get("temperature")]
        for key in sorted({(p["sites"], p["layer"]) for p in points}):
            pts = sorted((p["multiplier"], p["val_score"]) for p in alike if (p["sites"], p["layer"]) == key)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"val L{key[1]} {key[0]}")
        if algo in test:
            ax.plot([top["multiplier"]], [test[algo][metric]], marker="*", markersize=14, linestyle="",
                    color="black", label=f"test, chosen (L{top['layer']})")
        ax.set_xlabel("multiplier")
        ax.set_ylabel(METRIC_NAMES.get(metric, metric))
        ax.set_title(algo)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
