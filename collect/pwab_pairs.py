"""PersonalWAB contrast pairs: the model's successful tool calls vs. its unsuccessful ones.

For each training sample (``03_collect_pairs`` with task ``pwab``):

1. **Positive.**  Review tasks: the gold review, as an ``add_product_review`` call.
   Search / recommend tasks: the model's call given the user's own top ``positive_k``
   ranked history, kept when it names the right function and its result is good: a
   search score (``1 - rank/len``) above ``search_threshold``, the target in the
   recommended list (``recommend_in_list``; else the search threshold applies too).
   A sample without a positive gives no pair.
2. **Negatives.**  ``tries`` tries with the histories (top ``history_k``) of random
   other users (seeded per sample, or drawn once per chunk and try with
   ``others_pool="chunk"``: :func:`collect.pairs.chunk_histories`); a try is kept when it names the wrong function or
   its score is under the type's threshold (review: similarity under
   ``review_threshold``).  Unparseable tries are dropped (``dropped_empty``; their
   reasons are counted per sample and in ``summary.parse_failures``), so chosen
   and rejected are always canonical JSON calls of the same shape; a try identical to
   the positive or to an earlier try is ``dropped_duplicate``.

Pairs: ``{pair_id, user_id, sample_id, prompt, chosen, rejected, rouge_l, score,
rejected_score}`` with ``prompt`` = the request without history; ``score`` is the
positive's result score.  Generation, environment and encoder are injectable (tests).
The chunk loop, done-markers, drop reasons and summary are :mod:`collect.loop`.
"""

from __future__ import annotations

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
    if kind == "recommend" and cfg.recommend_in_list:
        return score > 0.0
    return score > cfg.search_threshold


def _judged(cfg, samples: list[dict], texts: list[str], env, encoder, failures: dict[str, Counter]
            ) -> list[tuple[ToolCall | None, bool, float]]:
    """(call, success, result score) of each generated text for its sample; parse failures
    are counted by reason under the sample's id."""
    calls = [parse_tool_call(t, failures.setdefault(s["id"], Counter())) for s, t in zip(samples, texts, strict=True)]
    scores = score_calls(calls, [s["type"] for s in samples], [s["target"] for s in samples], env, encoder)
    return [(c, bool(f) and _good(cfg, s["type"], a), a) for c, s, (f, a) in zip(calls, samples, scores, strict=True)]


def _positives(cfg, task, chunk, generate, env, encoder, tok, failures) -> dict[str, tuple[str, float]]:
    """sample id -> (canonical positive call, its score)."""
    out: dict[str, tuple[str, float]] = {}
    asked = []
    for s in chunk:
        if s["type"] == "review":
            review = target_review(s["target"]) or ""
            out[s["id"]] = (format_tool_call(ToolCall(TYPES["review"], {"review": review})), 1.0)
        else:
            asked.append(s)
    if asked:
        prompts = [task.prompt(s, s["history"][:cfg.positive_k], tok, cfg.max_prompt_tokens) for s in asked]
        verdicts = _judged(cfg, asked, generate(prompts), env, encoder, failures)
        for s, (call, ok, score) in zip(asked, verdicts, strict=True):
            if ok:
                out[s["id"]] = (format_tool_call(call), score)
    return out


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
        missing = [n for n in ("history_k", "positive_k", "search_threshold", "review_threshold", "recommend_in_list")
                   if getattr(cfg, n) is None]
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
        positives = _positives(cfg, task, samples, self.generate, self.env, self.encoder, tok, failures)
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
                            **counts})
        return pairs, markers

    @staticmethod
    def summarize(markers: list[dict], users: set[str]) -> dict[str, Any]:
        """:func:`summarize_pwab`."""
        return summarize_pwab(markers, users)


def summarize_pwab(markers: list[dict], users: set[str]) -> dict[str, Any]:
    """:func:`collect.pairs.summarize` plus unparseable answers by reason and positives by
    task type, from the done-markers of every run."""
    summary = summarize(markers, users)
    parse_failures: Counter = Counter()
    for m in markers:
        parse_failures.update(m.get("parse_failures", {}))
    summary["parse_failures"] = {"total": sum(parse_failures.values()), **dict(parse_failures)}
    by_type = Counter(m["type"] for m in markers if m.get("positive"))
    summary["pwab"] = {"positives": sum(by_type.values()), "positives_by_type": dict(sorted(by_type.items()))}
    return summary


def _judge(cfg, task: Task, sample: dict, positive: tuple[str, float] | None, verdicts: list, tok
           ) -> tuple[list[dict], dict]:
    """One sample's pairs and counts: its negative tries (parsed calls) against its positive."""
    if positive is None:
        return [], {"tries": len(verdicts)}
    chosen, chosen_score = positive

    def verdict(t: int, rejected: str) -> tuple[bool, dict]:
        _, success, score = verdicts[t]  # a success from other users' history is no negative
        return success, {"rouge_l": round(rouge_l(rejected, chosen), 4), "score": round(chosen_score, 4),
                         "rejected_score": round(score, 4)}

    records, counts = judge_tries(sample, [format_tool_call(c) if c is not None else None for c, _, _ in verdicts],
                                  chosen=chosen, prompt=task.prompt(sample, [], tok, cfg.max_prompt_tokens),
                                  query=task.query(sample), verdict=verdict, seen=(chosen,))
    return records, dict(counts)
