"""The one bootstrap behind every interval the program prints.

Stage 06 (``results.md``, ``--compare``) and the run report (``report.md``) both call
:func:`bootstrap_diff`, so the same two runs, metric, unit, resamples and seed give the
same interval in both files.

The default unit is the **user** (a cluster bootstrap): a user's samples share a history
and a writing style, so they are not independent, and resampling samples would claim more
certainty than the data has.  ``unit="sample"`` resamples samples, for comparison.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

UNITS = ("user", "sample")


def sample_values(scores: dict[str, Any], metric: str) -> dict[str, float]:
    """Per-sample values of ``metric`` by sample id: a per-sample key, or ``<key>_<type>``
    (e.g. PersonalWAB's ``facc_search``) over the samples of that type."""
    rows = scores["per_sample"]
    if rows and metric in rows[0]:
        return {r["id"]: r[metric] for r in rows}
    base, _, kind = metric.rpartition("_")
    return {r["id"]: r[base] for r in rows if base in r and r.get("type") == kind}


def shared_samples(scores_a: dict[str, Any], scores_b: dict[str, Any], metric: str) -> list[str]:
    """Ids of the samples both runs scored by ``metric``, sorted."""
    return sorted(set(sample_values(scores_a, metric)) & set(sample_values(scores_b, metric)))


def _groups(shared: list[str], user_of: dict[str, str], unit: str) -> list[list[int]]:
    """Positions in ``shared`` that are drawn together: one sample, or all of a user's."""
    if unit == "sample":
        return [[k] for k in range(len(shared))]
    if unit != "user":
        raise ValueError(f"unknown bootstrap unit {unit!r}; choose one of {list(UNITS)}")
    by_user: dict[str, list[int]] = defaultdict(list)
    for k, sample_id in enumerate(shared):
        if sample_id not in user_of:
            raise ValueError(f"sample {sample_id!r}: per-sample scores have no 'user_id' to resample users by; "
                             "rescore the run (stage 06) or pass unit='sample'")
        by_user[user_of[sample_id]].append(k)
    return list(by_user.values())


def bootstrap_diff(scores_a: dict[str, Any], scores_b: dict[str, Any], metric: str, *, unit: str = "user",
                   n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Paired bootstrap interval of mean(B - A) over the samples both runs scored.

    ``unit="user"`` draws users with replacement and pools their samples' paired
    differences (each draw's mean is over the samples of the drawn users); ``unit="sample"``
    draws samples.  Returns ``diff`` (the observed mean difference), the percentile interval
    ``low``/``high`` and its ``half_width``, ``p_le_0`` (the fraction of draws where B is not
    better than A, a one-sided bootstrap p-value), ``n`` samples, ``units`` drawn per
    resample, and the settings (``unit``, ``n_boot``, ``level``).
    """
    # A per-type metric (PersonalWAB's facc_search) pairs only the samples of its type.
    a, b = sample_values(scores_a, metric), sample_values(scores_b, metric)
    shared = shared_samples(scores_a, scores_b, metric)
    if not shared:
        raise ValueError(f"the two runs share no sample scored by {metric!r}: nothing to compare")
    diff = np.array([b[i] - a[i] for i in shared], dtype=float)
    groups = _groups(shared, {r["id"]: r["user_id"] for r in scores_a["per_sample"] if "user_id" in r}, unit)
    sums = np.array([diff[g].sum() for g in groups])
    counts = np.array([len(g) for g in groups], dtype=float)
    draw = np.random.default_rng(seed).integers(0, len(groups), size=(n_boot, len(groups)))
    means = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
    return {"diff": float(diff.mean()), "low": low, "high": high, "half_width": (high - low) / 2,
            "p_le_0": float((means <= 0).mean()), "n": len(shared), "units": len(groups), "unit": unit,
            "n_boot": n_boot, "level": level}
