"""Stage 03 for text tasks: contrast pairs (gold output vs. the model's output without the user).

For every training sample, ``tries`` tries prompt the model with ``history_k`` history
items of OTHER users (``rag="others"``) or with the user's own ranked history
(``rag="history"``).  The other users' items are drawn per sample (``others_pool="sample"``,
the seed's way) or once per chunk and try (``"chunk"``, :func:`chunk_histories`): then every
prompt of a chunk's try begins with the same tokens up to the question, and generation
computes that prefix once (``share_prefix``).  A try whose answer has ROUGE-L F1 below the task threshold
against the gold becomes a pair's ``rejected`` side, the gold its ``chosen`` side.  A
pair's ``prompt`` is the question without any history; its ``query`` is the task's query
text of the sample (what stage 05 retrieves pairs by).  The chunk loop, done-markers,
drop reasons and summary are :mod:`collect.loop`.  The generator is injectable (tests).
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from collect.loop import judge_tries, summarize
from data_process.config import choose
from eval.metrics import rouge_l
from steering.decoding import decoding_kwargs
from steering.generation import generate
from tasks import Task

RAG_MODES = ("others", "history")
OTHERS_POOLS = ("sample", "chunk")


def other_users_pools(samples: list[dict], other_samples: list[dict]) -> dict[str, list[dict]]:
    """For each user in ``samples``: the items of ``other_samples`` written by other users.

    An item whose id is one of the user's own samples or history items is left out too,
    in case two users share an item.
    """
    unique = list({s["id"]: s for s in other_samples}.values())
    own: dict[str, set[str]] = defaultdict(set)
    for s in samples + unique:
        own[s["user_id"]].add(s["id"])
        own[s["user_id"]].update(h["id"] for h in s.get("history", []))
    users = {s["user_id"] for s in samples}
    return {u: [s for s in unique if s["user_id"] != u and s["id"] not in own[u]] for u in users}


def try_histories(sample: dict, pool: list[dict], *, k: int, tries: int, rag: str, seed: int) -> list[list[dict]]:
    """The history of each try of ``sample``, seeded by (seed, sample id) alone."""
    rng = random.Random(f"{seed}:{sample['id']}")  # str seeds are stable across runs
    if rag == "others":
        return [rng.sample(pool, min(k, len(pool))) for _ in range(tries)]
    if rag != "history":
        raise ValueError(f"unknown rag mode {rag!r}; choose one of {list(RAG_MODES)}")
    own = [h for h in sample["history"] if h["id"] != sample["id"]]
    # Try 0 is the top-k ranked items; later tries draw k at random so that greedy
    # decoding does not just repeat the first answer.
    return [own[:k]] + [rng.sample(own, min(k, len(own))) for _ in range(tries - 1)]


def chunk_histories(samples: list[dict], pools: dict[str, list[dict]], *, tries: int, seed: int,
                    draw: Callable[[random.Random, list[dict]], list[dict]], need: int = 1
                    ) -> dict[str, list[list[dict]]]:
    """Sample id -> the history of each try, drawn once per chunk and try by ``draw(rng, pool)``.

    The draw is seeded by the chunk's first sample id and the try (a chunk is the stage's
    unit of work, the same at any batch size, worker count and resume point) and comes from
    the items every user of the chunk may see (no chunk user's own items), so all of a
    try's prompts share it.  Where that pool has fewer than ``need`` items, each user draws
    from its own pool instead (seeded by chunk, user and try).
    """
    users = list(dict.fromkeys(s["user_id"] for s in samples))
    allowed = set.intersection(*({item["id"] for item in pools.get(u, [])} for u in users))
    common = [item for item in pools.get(users[0], []) if item["id"] in allowed]
    key = f"{seed}:chunk:{samples[0]['id']}"
    histories: dict[str, list[list[dict]]] = {s["id"]: [] for s in samples}
    for t in range(tries):
        if len(common) >= need:
            drawn = dict.fromkeys(users, draw(random.Random(f"{key}:{t}"), common))
        else:
            drawn = {u: draw(random.Random(f"{key}:{u}:{t}"), pools.get(u, [])) for u in users}
        for s in samples:
            histories[s["id"]].append(drawn[s["user_id"]])
    return histories


def generator_for(cfg: Any, task: Task, model, tok, desc: str) -> Callable[[list[str]], list[str]]:
    """Messages -> answers with the stage-03 decoding settings of ``cfg`` and ``task``'s
    response prefix (and call constraint with ``cfg.constrained``), as stage 05 decodes."""
    return functools.partial(generate, model, tok, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                             do_sample=cfg.do_sample, temperature=cfg.sampling_temperature, top_p=cfg.top_p,
                             seed=cfg.seed, share_prefix=cfg.share_prefix, desc=desc,
                             **decoding_kwargs(task, model, tok, cfg.constrained))


class TextCollector:
    """Tries judged by ROUGE-L against the gold (task collector ``rouge``).

    ``cfg`` is the ``collect_pairs`` config with the task's defaults filled in;
    ``other_samples`` are every training sample (other users' items come from them).
    """

    def __init__(self, cfg: Any, task: Task, other_samples: list[dict], model, tok,
                 generate: Callable[[list[str]], list[str]] | None = None):
        if cfg.threshold is None:
            raise ValueError(f"task {task.name!r} has no default ROUGE-L threshold; pass --threshold")
        choose("rag mode", cfg.rag, dict.fromkeys(RAG_MODES))
        choose("others pool", cfg.others_pool, dict.fromkeys(OTHERS_POOLS))
        if cfg.others_pool == "chunk" and cfg.rag != "others":
            raise ValueError("--others-pool chunk draws other users' items: it needs --rag others")
        self.cfg, self.task, self.other_samples, self.tok = cfg, task, other_samples, tok
        self.generate = generate or generator_for(cfg, task, model, tok, "generate negatives")

    def chunk(self, samples: list[dict]) -> tuple[list[dict], list[dict]]:
        """The pairs and done-markers of ``samples``: all their tries go to the generator at once."""
        cfg, task, tok = self.cfg, self.task, self.tok
        pools = other_users_pools(samples, self.other_samples) if cfg.rag == "others" else {}
        if cfg.others_pool == "chunk":
            k = cfg.history_k
            histories = chunk_histories(samples, pools, tries=cfg.tries, seed=cfg.seed, need=k,
                                        draw=lambda rng, pool: rng.sample(pool, min(k, len(pool))))
        else:
            histories = {s["id"]: try_histories(s, pools.get(s["user_id"], []), k=cfg.history_k, tries=cfg.tries,
                                                rag=cfg.rag, seed=cfg.seed) for s in samples}
        messages = [task.prompt(sample, history, tok, cfg.max_prompt_tokens) for sample in samples
                    for history in histories[sample["id"]]]
        answers = self.generate(messages)
        if len(answers) != len(messages):
            raise RuntimeError(f"generator returned {len(answers)} answers for {len(messages)} prompts")
        pairs, markers = [], []
        for j, sample in enumerate(samples):
            records, marker = self._judge(sample, answers[j * cfg.tries:(j + 1) * cfg.tries])
            pairs += records
            markers.append(marker)
        return pairs, markers

    def _judge(self, sample: dict, answers: list[str]) -> tuple[list[dict], dict]:
        """One sample's pairs and done-marker (with the ROUGE-L of its distinct tries)."""
        scores: list[float] = []

        def verdict(_: int, answer: str) -> tuple[bool, dict]:
            score = rouge_l(answer, sample["output"])
            scores.append(round(score, 4))
            return score >= self.cfg.threshold, {"rouge_l": round(score, 4)}

        records, counts = judge_tries(sample, [self.task.postprocess(a).strip() for a in answers],
                                      chosen=sample["output"], verdict=verdict, query=self.task.query(sample),
                                      prompt=self.task.prompt(sample, [], self.tok, self.cfg.max_prompt_tokens))
        return records, {"sample_id": sample["id"], "user_id": sample["user_id"], **counts, "scores": scores}

    @staticmethod
    def summarize(markers: list[dict], users: set[str]) -> dict[str, Any]:
        """:func:`collect.loop.summarize`: the ROUGE-L of distinct tries included."""
        return summarize(markers, users)
