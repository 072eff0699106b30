"""Scores of a generation run, comparisons between runs, results tables and plots.

A run is a ``generations.jsonl`` of ``{id, user_id, generation, gold, ...}`` records.
:func:`score_records` gives every record its text metrics and averages them overall (over
samples, and over users) and per user; :func:`compare_scores` and :func:`intervals_vs` say
whether two runs on the same samples really differ (through :mod:`eval.bootstrap`, the one
bootstrap the run report uses too); :func:`results_table` and the ``plot_*`` functions turn
scores into something a person can read.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_process.progress import tqdm
from eval.bootstrap import bootstrap_diff, shared_samples
from eval.metrics import meteor_available, text_scores

TEXT_METRICS = ("rouge1", "rougeL", "meteor")
METRIC_NAMES = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "meteor": "METEOR", "style_adherence": "adherence"}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def score_records(records: list[dict[str, Any]], desc: str = "score") -> dict[str, Any]:
    """Text metrics of every record, their means overall and per user.

    Returns ``{"metrics", "n", "overall", "user_macro", "per_user", "per_sample",
    "meteor_unavailable"?}``: ``overall`` averages samples, ``user_macro`` averages the
    per-user means (each user counts once).  METEOR is left out, and the reason given,
    when WordNet is unavailable.
    """
    for i, record in enumerate(records):
        for key in ("id", "user_id", "generation", "gold"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"record {i} (id {record.get('id', '?')!r}): field {key!r} missing or not a string")
    metrics = [m for m in TEXT_METRICS if m != "meteor" or meteor_available()]
    per_sample = []
    for record in tqdm(records, desc=desc, leave=False):
        scores = text_scores(record["generation"], record["gold"])
        per_sample.append({"id": record["id"], "user_id": record["user_id"],
                           **{m: scores[m] for m in metrics}})
    by_user: dict[str, list[dict]] = defaultdict(list)
    for row in per_sample:
        by_user[row["user_id"]].append(row)
    per_user = {user: {"n": len(rows), **{m: _mean([r[m] for r in rows]) for m in metrics}}
                for user, rows in sorted(by_user.items())}
    result: dict[str, Any] = {
        "metrics": metrics,
        "n": len(per_sample),
        "n_users": len(per_user),
        "overall": {m: _mean([r[m] for r in per_sample]) for m in metrics},
        "user_macro": {m: _mean([u[m] for u in per_user.values()]) for m in metrics},
        "per_user": per_user,
        "per_sample": per_sample,
    }
    if "meteor" not in metrics:
        result["meteor_unavailable"] = "WordNet not found (run scripts/setup.sh); METEOR not reported"
    return result


def compare_scores(scores_a: dict[str, Any], scores_b: dict[str, Any], *, unit: str = "user",
                   n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Bootstrap interval of B - A (:func:`eval.bootstrap.bootstrap_diff`) per metric both runs scored."""
    metrics = [m for m in scores_a["metrics"] if m in scores_b["metrics"]]
    if not metrics or not shared_samples(scores_a, scores_b, metrics[0]):
        raise ValueError("the two runs share no sample ids: nothing to compare")
    return {m: bootstrap_diff(scores_a, scores_b, m, unit=unit, n_boot=n_boot, seed=seed) for m in metrics}


def intervals_vs(scores: dict[str, dict[str, Any]], baseline: str, metrics: Sequence[str], *, unit: str = "user",
                 n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, dict[str, Any]]]:
    """Bootstrap interval of each run minus ``baseline`` per metric, over the samples both scored
    (a metric they share no sample of is left out)."""
    return {name: {m: bootstrap_diff(scores[baseline], run, m, unit=unit, n_boot=n_boot, seed=seed)
                   for m in metrics if shared_samples(scores[baseline], run, m)}
            for name, run in scores.items() if name != baseline}


def interval_table(intervals: dict[str, dict[str, dict[str, float]]], metrics: Sequence[str]) -> str:
    """A Markdown table of :func:`intervals_vs`: ``diff [low, high]`` per run and metric,
    marked ``*`` where the interval excludes 0."""
    header = ["run", *[METRIC_NAMES.get(m, m) for m in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, by_metric in intervals.items():
        cells = []
        for m in metrics:
            r = by_metric.get(m)
            mark = "" if r is None or r["low"] <= 0 <= r["high"] else " *"
            cells.append("n/a" if r is None else f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]{mark}")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def format_comparison(name_a: str, name_b: str, result: dict[str, dict[str, Any]]) -> str:
    """Human-readable lines of a :func:`compare_scores` result."""
    first = next(iter(result.values()))
    lines = [f"{name_b} - {name_a} (paired bootstrap resampling {first['unit']}s: {first['n']} samples, "
             f"{first['units']} {first['unit']}s):"]
    for metric, r in result.items():
        verdict = "B better" if r["low"] > 0 else "A better" if r["high"] < 0 else "no clear difference"
        lines.append(f"  {METRIC_NAMES.get(metric, metric):8s} {r['diff']:+.4f}  "
                     f"{int(r['level'] * 100)}% CI [{r['low']:+.4f}, {r['high']:+.4f}]  {verdict}")
    return "\n".join(lines)


def results_table(rows: dict[str, dict[str, float]], metrics: Sequence[str] = TEXT_METRICS,
                  extra: dict[str, dict[str, str]] | None = None) -> str:
    """A Markdown table: one row per run name, one column per metric (plus ``extra``)."""
    extra = extra or {}
    extra_cols = sorted({c for v in extra.values() for c in v})
    header = ["run", *[METRIC_NAMES.get(m, m) for m in metrics], *extra_cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, scores in rows.items():
        cells = [name]
        for m in metrics:
            value = scores.get(m)
            cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value))
                         else f"{value:.4f}")
        cells += [extra.get(name, {}).get(c, "") for c in extra_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(points: list[dict[str, float]], path: str | Path, metric: str = "rougeL",
               baseline: float | None = None) -> Path:
    """Line plot of ``metric`` against the multiplier, one line per layer (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in sorted({p["layer"] for p in points}):
        pts = sorted((p["multiplier"], p[metric]) for p in points if p["layer"] == layer)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"layer {int(layer)}")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="rag")
    ax.set_xlabel("multiplier")
    ax.set_ylabel(METRIC_NAMES.get(metric, metric))
    ax.set_title(f"fints: {METRIC_NAMES.get(metric, metric)} vs multiplier")
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG, folders made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_runs(rows: dict[str, dict[str, float]], path: str | Path,
              metrics: Sequence[str] = TEXT_METRICS) -> Path:
    """Grouped bar chart of each run's metrics (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(m in r for r in rows.values())]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(rows), 1)
    for j, (name, scores) in enumerate(rows.items()):
        xs = [i + j * width for i in range(len(metrics))]
        ax.bar(xs, [scores.get(m, 0.0) for m in metrics], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))])
    ax.set_xticklabels([METRIC_NAMES.get(m, m) for m in metrics])
    ax.legend()
    return save_figure(fig, path)
