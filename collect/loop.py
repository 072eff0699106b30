"""What every pair collector shares: the done-markers, the drop reasons and the summary.

A collector (:mod:`collect.pairs` for text tasks, :mod:`collect.pwab_pairs` for
PersonalWAB) turns one chunk of training samples -- the stage's chunk, computed in one
piece -- into its pairs and one done-marker per sample (:meth:`Collector.chunk`).  The
rest is written once, here:

* :func:`judge_tries` -- a sample's tries against its chosen side: an empty try is
  ``dropped_empty``, a repeat ``dropped_duplicate``, one as good as the chosen side
  ``dropped_similar``, the others ``kept`` as pairs ``{pair_id, user_id, sample_id,
  prompt, query, chosen, rejected, ...}`` (``pair_id`` = sample id + ``-n`` + try).
* :class:`PairWriter` -- ``pairs.jsonl`` plus ``progress.jsonl``: after a sample's pairs,
  its done-marker with its counts (so samples that kept no pair are not redone).  On
  reopening, pairs of samples without a marker (a kill between the two writes) are
  removed, so a resumed run has neither duplicates nor gaps.
* :func:`summarize` -- kept/dropped counts per user and overall, from the done-markers of
  every run (a resumed one too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from data_process.artifact_io import JsonlWriter, read_jsonl, write_jsonl

COUNTS = ("tries", "kept", "dropped_similar", "dropped_empty", "dropped_duplicate")
SCORE_CUTS = (0.15, 0.2, 0.3, 0.4, 0.5)


class Collector(Protocol):
    """A task's way to collect pairs, built as ``Collector(cfg, task, other_samples, model,
    tok)``: one chunk of samples -> (pairs, done-markers); a run's markers -> its summary."""

    def chunk(self, samples: list[dict]) -> tuple[list[dict], list[dict]]: ...

    @staticmethod
    def summarize(markers: list[dict], users: set[str]) -> dict[str, Any]: ...


def judge_tries(sample: dict, tries: list[str | None], *, chosen: str, prompt: str, query: str,
                verdict: Callable[[int, str], tuple[bool, dict[str, Any]]], seen: tuple[str, ...] = ()
                ) -> tuple[list[dict], Counter]:
    """The pairs kept from one sample's tries (the rejected sides, ``None`` or '' when a try
    gave nothing usable) and the counts of kept and dropped tries.

    ``verdict(t, rejected)`` is asked for distinct, non-empty tries only: whether try ``t``
    is as good as ``chosen`` (dropped), and the fields its pair adds.  ``seen`` holds texts
    that count as duplicates from the start (e.g. the chosen side).
    """
    counts: Counter = Counter(tries=len(tries))
    records, known = [], set(seen)
    for t, rejected in enumerate(tries):
        if not rejected:
            counts["dropped_empty"] += 1
            continue
        if rejected in known:
            counts["dropped_duplicate"] += 1  # the same negative twice adds nothing
            continue
        known.add(rejected)
        good, fields = verdict(t, rejected)
        if good:
            counts["dropped_similar"] += 1
            continue
        counts["kept"] += 1
        records.append({"pair_id": f"{sample['id']}-n{t}", "user_id": sample["user_id"], "sample_id": sample["id"],
                        "prompt": prompt, "query": query, "chosen": chosen, "rejected": rejected, **fields})
    return records, counts


class PairWriter:
    """``pairs.jsonl`` plus ``progress.jsonl`` done-markers, resumable per sample.

    :meth:`add` writes a chunk's pairs and markers; ``done_ids`` holds the samples finished
    (by this run or an earlier one).
    """

    def __init__(self, out_dir: str | Path):
        out_dir = Path(out_dir)
        self.pairs_path, self.progress_path = out_dir / "pairs.jsonl", out_dir / "progress.jsonl"
        self.progress = JsonlWriter(self.progress_path)
        self.done_ids = {r["sample_id"] for r in self.progress.existing}
        if self.pairs_path.exists():
            kept = [r for r in read_jsonl(self.pairs_path) if r.get("sample_id") in self.done_ids]
            write_jsonl(self.pairs_path, kept)  # drops pairs of a sample cut off mid-way
        self.pairs = JsonlWriter(self.pairs_path)

    def add(self, pairs: list[dict], markers: list[dict]) -> None:
        """Write each marked sample's pairs, then its marker; a sample finished by an earlier
        run keeps that run's pairs."""
        by_sample: dict[str, list[dict]] = {}
        for pair in pairs:
            by_sample.setdefault(pair["sample_id"], []).append(pair)
        for marker in markers:
            if marker["sample_id"] in self.done_ids:
                continue
            for pair in by_sample.get(marker["sample_id"], []):
                self.pairs.write(pair)
            self.progress.write(marker)
            self.done_ids.add(marker["sample_id"])

    def markers(self) -> list[dict]:
        """The done-markers of every run so far."""
        return read_jsonl(self.progress_path)

    def close(self) -> None:
        self.pairs.close()
        self.progress.close()


def summarize(markers: list[dict], users: set[str]) -> dict[str, Any]:
    """Kept/dropped counts per user and overall, from the done-markers of every run."""
    per_user = {u: dict.fromkeys(("samples",) + COUNTS, 0) for u in sorted(users)}
    for marker in markers:
        row = per_user.setdefault(marker["user_id"], dict.fromkeys(("samples",) + COUNTS, 0))
        row["samples"] += 1
        for key in COUNTS:
            row[key] += int(marker.get(key, 0))
    totals = {key: sum(row[key] for row in per_user.values()) for key in ("samples",) + COUNTS}
    empty = sorted(u for u, row in per_user.items() if row["kept"] == 0)
    scores = sorted(x for marker in markers for x in marker.get("scores", []))
    # How many distinct tries other thresholds would keep: helps tune --threshold per dataset.
    below = {str(t): sum(x < t for x in scores) for t in SCORE_CUTS}
    quantiles = {f"p{q}": scores[min(len(scores) - 1, len(scores) * q // 100)]
                 for q in (10, 25, 50, 75, 90)} if scores else {}
    return {"totals": totals, "per_user": per_user, "users_without_pairs": empty,
            "rouge_l": {"quantiles": quantiles, "kept_below": below}}
