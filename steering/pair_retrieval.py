"""Which pairs fints retrieves for a request: the share of its own task type.

Stage 05's ``fints`` steers a request with the vectors of the user's ``top_pairs`` pairs
best retrieved by the request's query text (:class:`steering.aggregate.PairAggregator`).
A pair made from another task type (a review pair for a search request) pushes the call
toward the wrong function, so :func:`same_type_share` measures, per request type, the
share of retrieved pairs whose sample had the request's type, next to ``chance``: the
share of the user's pairs of that type (what retrieving at random would give).
:func:`retrieved` retrieves exactly as stage 05 does, on the pairs' records alone (no
vectors needed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from steering.aggregate import PairAggregator
from steering.vectors import VectorStore


def retrieved(pairs: list[dict], samples: list[dict], query: Callable[[dict], str], *, top_pairs: int,
              retriever: str = "bm25", pair_weighting: str = "softmax", softmax_temperature: float = 0.1,
              encoder=None) -> list[list[dict]]:
    """For each sample: the pairs fints aggregates for it (its user's, best first; [] for a
    user without pairs), retrieved by ``query(sample)`` as stage 05 retrieves them."""
    store = VectorStore({"hidden_size": 0}, pairs, tensors={})  # the index rows alone
    aggregator = PairAggregator(store, [], top_pairs=top_pairs, pair_weighting=pair_weighting,
                                softmax_temperature=softmax_temperature, retriever=retriever, encoder=encoder)
    out: list[list[dict]] = [[] for _ in samples]
    by_user: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_user.setdefault(str(s["user_id"]), []).append(i)
    for user, rows in by_user.items():
        picked = aggregator.select(user, [query(samples[i]) for i in rows])
        if picked is not None:
            for i, store_rows in zip(rows, picked[0].tolist(), strict=True):
                out[i] = [pairs[j] for j in store_rows]
    return out


def same_type_share(samples: list[dict], picked: list[list[dict]], pair_type: Callable[[dict], str],
                    user_pairs: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per request type (and ``all``): ``requests``, ``with_pairs`` (requests whose user has
    pairs), ``retrieved`` pairs, ``same_type`` among them, ``share`` = same_type / retrieved
    and ``chance`` = the mean share of the user's pairs of the request's type (None without
    retrieved pairs)."""
    rows: dict[str, dict[str, Any]] = {}
    for s, pairs in zip(samples, picked, strict=True):
        own = user_pairs.get(str(s["user_id"]), [])
        for kind in (s["type"], "all"):
            row = rows.setdefault(kind, {"requests": 0, "with_pairs": 0, "retrieved": 0, "same_type": 0,
                                         "chance_sum": 0.0})
            row["requests"] += 1
            row["retrieved"] += len(pairs)
            row["same_type"] += sum(pair_type(p) == s["type"] for p in pairs)
            if own:
                row["with_pairs"] += 1
                row["chance_sum"] += sum(pair_type(p) == s["type"] for p in own) / len(own)
    for row in rows.values():
        chance = row.pop("chance_sum")
        row["share"] = round(row["same_type"] / row["retrieved"], 4) if row["retrieved"] else None
        row["chance"] = round(chance / row["with_pairs"], 4) if row["with_pairs"] else None
    return dict(sorted(rows.items(), key=lambda kv: (kv[0] == "all", kv[0])))


def share_table(rows: dict[str, dict[str, Any]]) -> str:
    """:func:`same_type_share` as a Markdown table."""
    lines = ["| request type | requests | with pairs | retrieved | same type | share | chance |",
             "|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        share, chance = (f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("share", "chance"))
        lines.append(f"| {kind} | {r['requests']} | {r['with_pairs']} | {r['retrieved']} | {r['same_type']} "
                     f"| {share} | {chance} |")
    return "\n".join(lines)
