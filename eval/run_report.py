"""One readable report of a run folder: data, pairs, time, results with honest intervals.

The intervals come from :func:`eval.bootstrap.bootstrap_diff`, the same function stage 06
uses, and resample **users** by default (cluster bootstrap): a user's samples share a
history and a writing style, so they are not independent.  The per-sample interval stays
available (``unit="sample"``).  With a few dozen samples the half-width of an interval is the
smallest difference the data can detect; the report prints it beside every comparison,
and says how many comparisons were made (one in twenty crosses zero by chance alone).
"""

from __future__ import annotations

import subprocess
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_process.artifact_io import MANIFEST, read_json
from data_process.fingerprint import git_hash, package_versions
from eval.bootstrap import bootstrap_diff
from eval.report import METRIC_NAMES

SETTING_KEYS = ("history_k", "layers", "sites", "alpha", "beta", "multipliers", "vec_strategy",
                "top_pairs", "pair_weighting", "softmax_temperature", "retriever", "max_new_tokens")
STEERING_KEYS = set(SETTING_KEYS) - {"history_k", "max_new_tokens"}


def share_of_users_better(scores_a: dict, scores_b: dict, metric: str) -> float:
    """Fraction of the shared users whose mean ``metric`` is higher under B than under A."""
    users = sorted(set(scores_a["per_user"]) & set(scores_b["per_user"]))
    if not users:
        return float("nan")
    return sum(scores_b["per_user"][u][metric] > scores_a["per_user"][u][metric] for u in users) / len(users)


def _fmt_ci(r: dict[str, float]) -> str:
    mark = "" if r["low"] <= 0 <= r["high"] else " *"
    return f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]{mark}"


def results_section(scores: dict[str, dict], settings: dict[str, str], metrics: Sequence[str], *,
                    baseline: str = "rag", unit: str = "user", n_boot: int = 2000, seed: int = 0) -> list[str]:
    """Markdown lines: the scores table, and every method against ``baseline`` with intervals."""
    names = list(scores)
    header = ["method", *[METRIC_NAMES.get(m, m) for m in metrics], "n", "users", "settings"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        s = scores[name]
        cells = [name, *[f"{s['overall'][m]:.4f}" for m in metrics], str(s["n"]), str(s["n_users"]),
                 settings.get(name, "")]
        lines.append("| " + " | ".join(cells) + " |")
    others = [n for n in names if n != baseline]
    if baseline not in scores or not others:
        return lines + ["", f"(no `{baseline}` run to compare against)"]
    n_cmp = len(others) * len(metrics)
    lines += ["", f"Difference to `{baseline}` (mean, 95% bootstrap interval resampling {unit}s; "
                  f"* = interval excludes 0; {n_cmp} comparisons, so about {0.05 * n_cmp:.1f} would "
                  "exclude 0 by chance alone at no true difference):", ""]
    key = "rougeL" if "rougeL" in metrics else metrics[0]  # the metric of the last two columns
    key_name = METRIC_NAMES.get(key, key)
    header = ["method", *[f"Δ{METRIC_NAMES.get(m, m)}" for m in metrics], f"detectable (±, {key_name})",
              f"users better than {baseline} ({key_name})"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in others:
        cis = {m: bootstrap_diff(scores[baseline], scores[name], m, unit=unit, n_boot=n_boot, seed=seed)
               for m in metrics}
        share = share_of_users_better(scores[baseline], scores[name], key)
        lines.append("| " + " | ".join([name, *[_fmt_ci(cis[m]) for m in metrics],
                                        f"{cis[key]['half_width']:.3f}", f"{share:.0%}"]) + " |")
    return lines


def describe_settings(manifest: dict[str, Any]) -> str:
    """The settings of one generation run that a reader needs, from its manifest."""
    cfg = (manifest.get("fingerprint") or {}).get("settings") or manifest.get("config", {})
    steers = manifest.get("steering") is not None
    keys = [k for k in SETTING_KEYS if k in cfg and (steers or k not in STEERING_KEYS)]
    if cfg.get("multipliers"):
        keys = [k for k in keys if k not in ("alpha", "beta")]
    if cfg.get("algo") == "steer":
        keys = [k for k in keys if k not in ("top_pairs", "pair_weighting", "softmax_temperature", "retriever")]
    elif cfg.get("algo") == "fints":
        keys = [k for k in keys if k != "vec_strategy"]
    return ", ".join(f"{k}={cfg[k]}" for k in keys)


def git_state() -> str:
    """'<commit>' plus ' (dirty)' when the working tree has uncommitted changes."""
    commit = git_hash() or "unknown"
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=5)
        dirty = bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return commit + (" (dirty)" if dirty else "")


def _manifest(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def data_section(run_dir: Path) -> list[str]:
    """Split sizes from stage 01, pairs kept/dropped from stage 03, seconds per stage."""
    lines = []
    data = _manifest(run_dir / "data" / MANIFEST)
    if data:
        lines += [f"Users: {len(data.get('seen_users', []))} seen, {len(data.get('unseen_users', []))} unseen.", "",
                  "| split | samples |", "|---|---|"]
        lines += [f"| {name} | {n} |" for name, n in data.get("counts", {}).items()]
    pairs = _manifest(run_dir / "pairs" / MANIFEST)
    if pairs and pairs.get("totals"):
        t = pairs["totals"]
        dropped = ", ".join(f"{k[len('dropped_'):]} {v}" for k, v in t.items() if k.startswith("dropped_"))
        lines += ["", f"Pairs (stage 03): {t.get('kept', 0)} kept of {t.get('tries', 0)} tries on "
                      f"{t.get('samples', 0)} training samples; dropped: {dropped or 'none'}; users without pairs: "
                      f"{len(pairs.get('users_without_pairs') or [])}."]
    seconds: dict[str, list[float]] = defaultdict(list)  # stage -> seconds of each of its runs
    for path in run_dir.rglob(MANIFEST):
        manifest = read_json(path)
        if manifest.get("stage"):
            seconds[manifest["stage"]].append(float(manifest.get("seconds") or 0.0))
    if seconds:
        lines += ["", "| stage | runs | seconds |", "|---|---|---|"]
        lines += [f"| {stage} | {len(v)} | {sum(v):.1f} |" for stage, v in sorted(seconds.items())]
        lines.append(f"| total | {sum(len(v) for v in seconds.values())} | {sum(map(sum, seconds.values())):.1f} |")
    return lines


def provenance_section() -> list[str]:
    """Git commit (with dirty flag) and package versions."""
    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items())
    return [f"Code: git {git_state()}.", f"Packages: {versions}."]
