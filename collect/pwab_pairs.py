"""PersonalWAB contrast pairs: the model's successful tool calls vs. its unsuccessful ones.

For each training sample (``03_collect_pairs`` with task ``pwab``):

1. **Positive.**  Review tasks: the gold review, as an ``add_product_review`` call.
   Search / recommend tasks: the model's calls given the user's own top ``positive_k``
   ranked history -- ``positive_tries`` of them: try 0 decoded as the stage decodes
   (greedy by default), the others sampled at ``positive_temperature`` (seeded per try
   and prompt, :func:`try_seed`) -- of which the best-scoring success is kept (ties: the
   earlier try).  A success names the right function and, for search, scores
   (``1 - rank/len``) above ``search_threshold``; a recommend call is one whatever its
   list (the seed's rule), or with ``recommend_in_list`` only when the target is in it.
   A sample without a positive gives no pair.  Its done-marker counts its positive
   tries and successes (``summary.pwab.by_type`` sums them per task type).
2. **Negatives.**  ``tries`` tries with the histories (top ``history_k``) of random
   other users (seeded per sample, or drawn once per chunk and try with
   ``others_pool="chunk"``: :func:`collect.pairs.chunk_histories`); a try is kept when it
   is no success: it names the wrong function or its score is under the type's threshold
   (review: similarity under ``review_threshold``; by the seed's rule every recommender
   call is a success).  Unparseable tries are dropped (``dropped_empty``; their reasons
   are counted per sample and in ``summary.parse_failures``), so chosen
   and rejected are always canonical JSON calls of the same shape; a try identical to
   the positive or to an earlier try is ``dropped_duplicate``.

Pairs: ``{pair_id, user_id, sample_id, prompt, query, chosen, rejected, type, rouge_l,
score, rejected_score}`` with ``prompt`` = the request without history, ``type`` the
sample's task type; ``score`` is the positive's result score.  Generation, environment
and encoder are injectable (tests).  The chunk loop, done-markers, drop reasons and summary are :mod:`collect.loop`.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from collect.loop import judge_tries, summarize
from collect.pairs import chunk_histories, generator_for, other_users_pools
from eval.metrics import rouge_l
from eval.pwab_env import PwabEnv, default_cache_dir
from eval.pwab_eval import score_calls, target_review
from eval.pwab_tools import TYPES, ToolCall, format_tool_call, parse_tool_call
from tasks import Task


def _good(cfg, kind: str, score: float) -> bool:
    """Whether a right-function call's result score makes it a success."""
    if kind == "review":
        return score > cfg.review_threshold
    if kind == "recommend":
        # The seed's rule by default: any call of the recommender (its list is SASRec's,
        # whatever the sequence); --recommend-in-list: the target must be in its list.
        return score > 0.0 if cfg.recommend_in_list else True
    return score > cfg.search_threshold


def _judged(cfg, samples: list[dict], texts: list[str], env, encoder, failures: dict[str, Counter]
            ) -> list[tuple[ToolCall | None, bool, float]]:
    """(call, success, result score) of each generated text for its sample; parse failures
    are counted by reason under the sample's id."""
    calls = [parse_tool_call(t, failures.setdefault(s["id"], Counter())) for s, t in zip(samples, texts, strict=True)]
    scores = score_calls(calls, [s["type"] for s in samples], [s["target"] for s in samples], env, encoder)
    return [(c, bool(f) and _good(cfg, s["type"], a), a) for c, s, (f, a) in zip(calls, samples, scores, strict=True)]


def try_seed(seed: int, t: int) -> int:
    """The sampling seed of positive try ``t`` (>= 1).  :func:`steering.generation.generate`
    seeds each row by this and its prompt, so a try's call depends on (seed, sample, t)
    alone -- not on the batch, the chunk or the worker -- and tries of one prompt differ."""
    return int.from_bytes(hashlib.sha256(f"{seed}:pwab-positive:{t}".encode()).digest()[:4], "little")


def _positives(cfg, task, chunk, generate, env, encoder, tok, failures
               ) -> tuple[dict[str, tuple[str, float]], dict[str, dict[str, int]]]:
    """sample id -> (canonical positive call, its score), and sample id -> the counts of
    its positive tries (``positive_tries``, ``positive_successes``, ``positive_try``).

    Try 0 decodes as the stage does (greedy by default); tries 1 .. positive_tries - 1
    sample at ``positive_temperature``.  The best-scoring success wins (ties: the earlier try).
    """
    out: dict[str, tuple[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    asked = []
    for s in chunk:
        if s["type"] == "review":
            review = target_review(s["target"]) or ""
            out[s["id"]] = (format_tool_call(ToolCall(TYPES["review"], {"review": review})), 1.0)
        else:
            asked.append(s)
    if not asked:
        return out, counts
    prompts = [task.prompt(s, s["history"][:cfg.positive_k], tok, cfg.max_prompt_tokens) for s in asked]
    best: dict[str, tuple[float, int, ToolCall]] = {}
    for t in range(cfg.positive_tries):
        # One call per try over the chunk's samples; a sampled try samples every row.
        texts = generate(prompts) if t == 0 else generate(
            prompts, do_sample=True, temperature=cfg.positive_temperature, top_p=cfg.top_p, seed=try_seed(cfg.seed, t))
        for s, (call, ok, score) in zip(asked, _judged(cfg, asked, texts, env, encoder, failures), strict=True):
            row = counts.setdefault(s["id"], {"positive_tries": 0, "positive_successes": 0})
            row["positive_tries"] += 1
            if ok:
                row["positive_successes"] += 1
                if s["id"] not in best or score > best[s["id"]][0]:
                    best[s["id"]] = (score, t, call)
    for sample_id, (score, t, call) in best.items():
        out[sample_id] = (format_tool_call(call), score)
        counts[sample_id]["positive_try"] = t
    return out, counts


def _donor_history(rng: random.Random, pool: list[dict], k: int) -> list[dict]:
    """The top-k history of a random other user's sample (none when no sample has one)."""
    donors = [s for s in pool if s.get("history")]
    return rng.choice(donors)["history"][:k] if donors else []


def _other_histories(cfg, samples: list[dict], pools: dict[str, list[dict]]) -> dict[str, list[list[dict]]]:
    """Sample id -> history of each negative try: a donor drawn per sample (seeded by its id)
    or, with ``others_pool="chunk"``, once per chunk and try (shared prompt prefixes)."""
    k = cfg.history_k
    if cfg.others_pool == "chunk":
        return chunk_histories(samples, pools, tries=cfg.tries, seed=cfg.seed,
                               draw=lambda rng, pool: _donor_history(rng, pool, k))
    out = {}
    for s in samples:
        rng = random.Random(f"{cfg.seed}:pwab:{s['id']}")  # str seeds are stable across runs
        out[s["id"]] = [_donor_history(rng, pools.get(s["user_id"], []), k) for _ in range(cfg.tries)]
    return out


class PwabCollector:
    """PersonalWAB pairs (task collector ``tool_calls``).

    ``cfg`` is the ``collect_pairs`` config with the task's defaults filled in (positive_k,
    history_k, tries, search_threshold, review_threshold, recommend_in_list,
    max_prompt_tokens, seed, run_dir, data_dir, decoding settings).
    """

    def __init__(self, cfg, task: Task, other_samples: list[dict], model, tok, *,
                 generate: Callable[[list[str]], list[str]] | None = None, env=None, encoder=None):
        missing = [n for n in ("history_k", "positive_k", "search_threshold", "review_threshold", "recommend_in_list",
                               "positive_tries", "positive_temperature") if getattr(cfg, n) is None]
        if missing:
            raise ValueError(f"PersonalWAB pair collection needs settings {missing} "
                             "(the pwab task's defaults fill them)")
        self.cfg, self.task, self.other_samples, self.tok, self.encoder = cfg, task, other_samples, tok, encoder
        # The raw text is parsed by parse_tool_call, which finds the call among echoed schemas.
        self.generate = generate or generator_for(cfg, task, model, tok, "pwab calls")
        self.env = env or PwabEnv(cfg.data_dir, default_cache_dir(cfg.run_dir))

    def chunk(self, samples: list[dict]) -> tuple[list[dict], list[dict]]:
        """The pairs and done-markers of ``samples``: positives first, then every negative try at once."""
        cfg, task, tok = self.cfg, self.task, self.tok
        failures: dict[str, Counter] = {}
        positives, tried = _positives(cfg, task, samples, self.generate, self.env, self.encoder, tok, failures)
        histories = _other_histories(cfg, samples, other_users_pools(samples, self.other_samples))
        tries = [(s, h) for s in samples if s["id"] in positives for h in histories[s["id"]]]
        texts = self.generate([task.prompt(s, h, tok, cfg.max_prompt_tokens) for s, h in tries]) if tries else []
        by_sample: dict[str, list] = {}
        verdicts = _judged(cfg, [s for s, _ in tries], texts, self.env, self.encoder, failures)
        for (s, _), verdict in zip(tries, verdicts, strict=True):
            by_sample.setdefault(s["id"], []).append(verdict)
        pairs, markers = [], []
        for s in samples:
            records, counts = _judge(cfg, task, s, positives.get(s["id"]), by_sample.get(s["id"], []), tok)
            pairs += records
            markers.append({"sample_id": s["id"], "user_id": s["user_id"], "type": s["type"],
                            "positive": s["id"] in positives, "parse_failures": dict(failures.get(s["id"], {})),
                            **tried.get(s["id"], {"positive_tries": 0, "positive_successes": 0}), **counts})
        return pairs, markers

    @staticmethod
    def summarize(markers: list[dict], users: set[str]) -> dict[str, Any]:
        """:func:`summarize_pwab`."""
        return summarize_pwab(markers, users)


PER_TYPE = ("tasks", "positive_tries", "successes", "positives", "kept_pairs")


def summarize_pwab(markers: list[dict], users: set[str]) -> dict[str, Any]:
    """:func:`collect.pairs.summarize` plus unparseable answers by reason and, per task type,
    tasks, positive tries, their successes, positives and kept pairs (``pwab.by_type``),
    from the done-markers of every run."""
    summary = summarize(markers, users)
    parse_failures: Counter = Counter()
    for m in markers:
        parse_failures.update(m.get("parse_failures", {}))
    summary["parse_failures"] = {"total": sum(parse_failures.values()), **dict(parse_failures)}
    per_type = {kind: dict.fromkeys(PER_TYPE, 0) for kind in TYPES}
    for m in markers:
        if m.get("type") not in per_type:
            continue
        row = per_type[m["type"]]
        row["tasks"] += 1
        row["positive_tries"] += int(m.get("positive_tries", 0))
        row["successes"] += int(m.get("positive_successes", 0))
        row["positives"] += int(bool(m.get("positive")))
        row["kept_pairs"] += int(m.get("kept", 0))
    by_type = {kind: row["positives"] for kind, row in sorted(per_type.items()) if row["positives"]}
    summary["pwab"] = {"positives": sum(by_type.values()), "positives_by_type": by_type, "by_type": per_type}
    return summary


def _judge(cfg, task: Task, sample: dict, positive: tuple[str, float] | None, verdicts: list, tok
           ) -> tuple[list[dict], dict]:
    """One sample's pairs and counts: its negative tries (parsed calls) against its positive."""
    if positive is None:
        return [], {"tries": len(verdicts)}
    chosen, chosen_score = positive

    def verdict(t: int, rejected: str) -> tuple[bool, dict]:
        _, success, score = verdicts[t]  # a success from other users' history is no negative
        return success, {"type": sample["type"], "rouge_l": round(rouge_l(rejected, chosen), 4),
                         "score": round(chosen_score, 4), "rejected_score": round(score, 4)}

    records, counts = judge_tries(sample, [format_tool_call(c) if c is not None else None for c, _, _ in verdicts],
                                  chosen=chosen, prompt=task.prompt(sample, [], tok, cfg.max_prompt_tokens),
                                  query=task.query(sample), verdict=verdict, seen=(chosen,))
    return records, dict(counts)
