"""Multiplier response curves of a tuned run: each metric against the steering multiplier,
per method, site set and layer (the validation points ``scripts/tune.py`` records), with
baseline runs drawn as lines and rag as the curve's point at multiplier 0."""

from __future__ import annotations

from pathlib import Path

from eval.report import METRIC_NAMES, save_figure


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
    return save_figure(fig, path)
