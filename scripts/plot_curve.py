"""Plot the multiplier response curve of a tuned run: each metric vs multiplier, per method and layer.

    python -m scripts.plot_curve --run-dir runs/style --metrics style_adherence rougeL \
        --baselines rag zeroshot --out runs/style/tune/curve.png

Reads ``{run_dir}/tune/tune.json`` (every validation point of scripts/tune.py) and, for each
``--baselines`` name, ``{run_dir}/generations/{val_split}/{name}/eval/scores.json`` (run it
first: ``05_generate --algo rag --split seen_val --eval``).  A baseline is drawn as a dashed
line; rag is also the curve's point at multiplier 0 (steering by 0 is the RAG prompt
alone).  Prints the points as a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_process.artifact_io import read_json
from eval.report import METRIC_NAMES


def _baselines(run_dir: Path, split: str, names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        path = run_dir / "generations" / split / name / "eval" / "scores.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no scores; run 05_generate --algo {name} --split {split} --eval first")
        out[name] = read_json(path)["overall"]
    return out


def curve_table(points: dict[str, list[dict]], metrics: list[str], baselines: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per method, site set, layer and multiplier."""
    names = [METRIC_NAMES.get(m, m) for m in metrics]
    lines = ["| method | sites | layer | multiplier | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    lines += [f"| {name} | - | - | 0 | " + " | ".join(f"{b[m]:.3f}" for m in metrics) + " |"
              for name, b in baselines.items()]
    for algo, pts in points.items():
        for p in sorted(pts, key=lambda p: (p["sites"], p["layer"], p["multiplier"])):
            lines.append(f"| {algo} | {p['sites']} | {p['layer']} | {p['multiplier']:g} | "
                         + " | ".join(f"{p['val'][m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines)


def plot_curves(points: dict[str, list[dict]], metrics: list[str], baselines: dict[str, dict[str, float]],
                path: Path, title: str = "") -> Path:
    """One panel per metric (rows) and method (columns); one line per site set and layer."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), len(points), figsize=(5 * len(points), 3.2 * len(metrics)),
                             squeeze=False)
    for col, (algo, pts) in enumerate(points.items()):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for sites, layer in sorted({(p["sites"], p["layer"]) for p in pts}):
                line = sorted((p["multiplier"], p["val"][metric]) for p in pts
                              if (p["sites"], p["layer"]) == (sites, layer))
                if "rag" in baselines:
                    line = [(0.0, baselines["rag"][metric])] + line
                ax.plot([x for x, _ in line], [y for _, y in line], marker="o", label=f"L{layer} {sites}")
            for k, (name, scores) in enumerate(baselines.items()):
                ax.axhline(scores[metric], linestyle="--", color=f"C{7 + k}", label=name)
            ax.set_xlabel("multiplier")
            ax.set_ylabel(METRIC_NAMES.get(metric, metric))
            ax.set_title(f"{algo}{': ' + title if title else ''}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="run folder with tune/tune.json")
    parser.add_argument("--metrics", nargs="+", default=["rougeL"], help="metrics to plot (one row each)")
    parser.add_argument("--baselines", nargs="*", default=[], help="runs of the validation split drawn as lines")
    parser.add_argument("--out", type=Path, default=None, help="PNG (default {run_dir}/tune/curve.png)")
    args = parser.parse_args()
    tune = read_json(args.run_dir / "tune" / "tune.json")
    baselines = _baselines(args.run_dir, tune["val_split"], args.baselines)
    out = plot_curves(tune["points"], args.metrics, baselines, args.out or args.run_dir / "tune" / "curve.png",
                      title=tune["val_split"])
    print(curve_table(tune["points"], args.metrics, baselines))
    print(f"plot -> {out}")


if __name__ == "__main__":
    main()
