"""PersonalWAB scores: function accuracy (FACC) and result accuracy (RACC) per task type.

For each generated call (parsed with :func:`eval.pwab_tools.parse_tool_call`):

* FACC = 1 when the call names the task type's function (search ->
  ``search_product_by_query``, recommend -> ``get_recommendations_by_history``, review ->
  ``add_product_review``), else 0.  An unparseable generation scores 0 and is counted
  in ``parse_failures`` (by reason).
* RACC (0 whenever FACC is 0): search and recommend execute the call in
  :class:`eval.pwab_env.PwabEnv` and score ``1 - rank / len(results)`` when the target
  asin is in the returned list (rank 0 = first), else 0; review scores the cosine
  similarity of mean-pooled all-MiniLM-L6-v2 embeddings of the generated and the gold
  review (an empty review scores 0).

``overall`` averages samples, ``user_macro`` the per-user means; keys are ``facc``,
``racc`` and ``facc_<type>``, ``racc_<type>``, ``n_<type>`` for each type present.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from data_process.progress import tqdm
from eval.pwab_tools import TYPES, ToolCall, parse_tool_call

SAMPLE_METRICS = ["facc", "racc"]
PWAB_METRICS = ["facc", "racc"] + [f"{m}_{t}" for t in TYPES for m in ("facc", "racc")]
_FUNCTION_TYPE = {name: kind for kind, name in TYPES.items()}


def target_asin(target: Any) -> str | None:
    """The target product's asin: ``target.product_info.parent_asin`` (or ``asin`` keys, or a str)."""
    if isinstance(target, str):
        return target
    if not isinstance(target, dict):
        return None
    info = target.get("product_info")
    if isinstance(info, dict) and isinstance(info.get("parent_asin"), str):
        return info["parent_asin"]
    for key in ("parent_asin", "asin"):
        if isinstance(target.get(key), str):
            return target[key]
    return None


def target_review(target: Any) -> str | None:
    """The gold review text: ``target.review.text`` (or ``target.review`` as a string)."""
    review = target.get("review") if isinstance(target, dict) else None
    if isinstance(review, dict):
        review = review.get("text")
    return review if isinstance(review, str) else None


def rank_score(results: list[str], target: str | None) -> float:
    """``1 - rank / len(results)`` for a target found at 0-based ``rank``, else 0."""
    if target is None or target not in results:
        return 0.0
    return 1.0 - results.index(target) / len(results)


def review_similarity(encoder, generated: list[str], gold: list[str]) -> list[float]:
    """Cosine similarity of each (generated, gold) pair, encoded in one batch."""
    if not generated:
        return []
    emb = encoder.encode(list(generated) + list(gold))
    a, b = emb[:len(generated)], emb[len(generated):]
    sims = (a * b).sum(-1).tolist()
    return [s if g.strip() else 0.0 for s, g in zip(sims, generated, strict=True)]


def score_calls(calls: list[ToolCall | None], kinds: list[str], targets: list[Any], env, encoder=None,
                desc: str = "pwab scores") -> list[tuple[float, float]]:
    """(FACC, RACC) of each call for its task type and target; reviews scored in one batch."""
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(calls)
    reviews: list[tuple[int, str, str]] = []
    rows = list(zip(calls, kinds, targets, strict=True))
    for i, (call, kind, target) in enumerate(tqdm(rows, desc=desc, leave=False)):
        if call is None or call.name != TYPES[kind]:
            continue
        if kind == "review":
            reviews.append((i, call.arguments["review"], target_review(target) or ""))
        else:
            out[i] = (1.0, rank_score(env.run(call), target_asin(target)))
    if reviews:
        if encoder is None:
            from data_process.dense import shared_encoder

            encoder = shared_encoder()
        sims = review_similarity(encoder, [g for _, g, _ in reviews], [t for _, _, t in reviews])
        for (i, _, _), sim in zip(reviews, sims, strict=True):
            out[i] = (1.0, float(sim))
    return out


def record_kind(record: dict[str, Any], where: str) -> str:
    """The task type of a generations record (``type``, else the gold call's function)."""
    kind = record.get("type")
    if kind is None and isinstance(record.get("gold"), str):
        gold = parse_tool_call(record["gold"], Counter())
        kind = _FUNCTION_TYPE.get(gold.name) if gold else None
    if kind not in TYPES:
        raise ValueError(f"{where}: field 'type' missing or not one of {sorted(TYPES)} (got {kind!r})")
    return kind


def _means(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {"n": len(rows)}
    for m in SAMPLE_METRICS:
        out[m] = sum(r[m] for r in rows) / len(rows) if rows else float("nan")
    for kind in TYPES:
        typed = [r for r in rows if r["type"] == kind]
        if typed:
            out[f"n_{kind}"] = len(typed)
            for m in SAMPLE_METRICS:
                out[f"{m}_{kind}"] = sum(r[m] for r in typed) / len(typed)
    return out


def evaluate_pwab(records: list[dict[str, Any]], data_dir: str | Path, cache_dir: str | Path, *,
                  encoder=None, env=None, sasrec_dir: str | Path | None = None) -> dict[str, Any]:
    """Score generations.jsonl rows ``{id, user_id, generation, gold, type, target, ...}``.

    ``cache_dir`` holds the search index (built on first use) and, unless ``sasrec_dir``
    is given, the SASRec checkpoint in ``cache_dir/sasrec`` (``scripts.train_sasrec``).
    Returns ``{"metrics", "overall", "user_macro", "per_user", "per_sample", "n_users",
    "parse_failures"}``.
    """
    if env is None:
        from eval.pwab_env import PwabEnv

        env = PwabEnv(data_dir, cache_dir, sasrec_dir=sasrec_dir)
    failures: Counter = Counter()
    calls, kinds, targets = [], [], []
    for i, r in enumerate(records):
        where = f"record {i} (id {r.get('id', '?')!r})"
        for key in ("id", "user_id", "generation"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{where}: field {key!r} missing or not a string")
        kinds.append(record_kind(r, where))
        if "target" not in r:
            raise ValueError(f"{where}: field 'target' missing (05_generate must copy the sample's target)")
        targets.append(r["target"])
        calls.append(parse_tool_call(r["generation"], failures))
    scores = score_calls(calls, kinds, targets, env, encoder)
    per_sample = [{"id": r["id"], "user_id": r["user_id"], "type": kind, "facc": f, "racc": a,
                   "function": call.name if call else None}
                  for r, kind, call, (f, a) in zip(records, kinds, calls, scores, strict=True)]
    by_user: dict[str, list[dict]] = defaultdict(list)
    for row in per_sample:
        by_user[row["user_id"]].append(row)
    per_user = {u: _means(rows) for u, rows in sorted(by_user.items())}
    macro = {m: sum(u[m] for u in per_user.values()) / len(per_user) for m in SAMPLE_METRICS} if per_user else {}
    return {"metrics": SAMPLE_METRICS, "overall": _means(per_sample), "user_macro": macro,
            "per_user": per_user, "per_sample": per_sample, "n_users": len(per_user),
            "parse_failures": {"total": sum(failures.values()), **dict(failures)}}
