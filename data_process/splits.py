"""Seeded user selection and the experiment splits of stage 01.

* **seen users** (``num_users``): users with at least ``min_train`` training samples, at
  least one test sample and at least ``min_history`` history items (the longest history
  among their test samples).  Their training samples form ``train``, their test samples
  ``seen_test``.
* **unseen users** (``num_unseen``): other users with a test sample and ``min_history``
  items; only their test samples are used (``unseen_test``), Fints has no pairs for them.
* ``remain_train``: the training samples of every user that is not a seen user.
* **sparsity** (``history_rate`` R < 1): each seen user keeps a seeded fraction R of their
  training samples (at least one); the dropped samples also leave the histories of that
  user's other samples, so the user's record really is sparse.
* **fast-changing users** (``clusters``): seen users are ranked by how similar their test
  inputs are to their own history -- per test sample the mean BM25 score of the query
  against its history items divided by the query's score against itself (``bm25``), or the
  mean cosine similarity of MiniLM embeddings (``dense``); averaged over the user's test
  samples -- and cut into three equal groups, ``seen_test_cluster0`` the most similar and
  ``seen_test_cluster2`` the least similar (the fast-changing users).
* **validation** (``val_questions`` V): each seen user's V latest training *questions*
  (time order) become ``seen_val`` and leave ``train``, and so does every training sample
  or history item carrying one of them (same id or same gold text), so no pair, vector or
  promoted history sample is built from a validation answer.  Test histories keep them:
  they are in the user's past.  Settings are tuned on ``seen_val``, never on a test split.

Users are sorted by id before the seeded shuffle, so the same seed picks the same users
whatever the file order.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_process.config import choose
from data_process.progress import tqdm
from data_process.ranking import Query, dense_vectors, item_text, sample_input
from data_process.records import Benchmark
from data_process.text import BM25

SPLITS = ("train", "seen_val", "seen_test", "unseen_test", "remain_train")


@dataclass
class Splits:
    """The split files of stage 01 (name -> samples) and how they were made."""

    files: dict[str, list[dict]]
    seen_users: list[str]
    unseen_users: list[str]
    dropped: int = 0
    user_similarity: dict[str, float] = field(default_factory=dict)
    clusters: list[list[str]] = field(default_factory=list)


def user_counts(bench: Benchmark) -> dict[str, dict[str, int]]:
    """Per user: training samples, test samples, history items (longest test history)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "test": 0, "history": 0})
    for s in bench.train:
        counts[s["user_id"]]["train"] += 1
    for s in bench.test:
        c = counts[s["user_id"]]
        c["test"] += 1
        c["history"] = max(c["history"], len(s["history"]))
    return dict(counts)


def select_users(bench: Benchmark, *, num_users: int, num_unseen: int, min_history: int,
                 min_train: int, seed: int) -> tuple[list[str], list[str]]:
    """Seeded choice of seen and unseen users (each list sorted by user id)."""
    counts = user_counts(bench)
    rng = random.Random(seed)
    test_ready = sorted(u for u, c in counts.items() if c["test"] >= 1 and c["history"] >= min_history)
    pool = [u for u in test_ready if counts[u]["train"] >= min_train]
    if num_users > len(pool):
        raise ValueError(f"asked for {num_users} seen users, but only {len(pool)} of {len(counts)} users "
                         f"have >= {min_train} training samples (--min-train), a test sample and "
                         f">= {min_history} history items (--min-history)")
    rng.shuffle(pool)
    seen = sorted(pool[:num_users])
    rest = [u for u in test_ready if u not in set(seen)]
    if num_unseen > len(rest):
        raise ValueError(f"asked for {num_unseen} unseen users, but only {len(rest)} users outside the "
                         f"{num_users} seen ones have a test sample and >= {min_history} history items")
    rng.shuffle(rest)
    return seen, sorted(rest[:num_unseen])


def apply_history_rate(train: list[dict], seen_test: list[dict], rate: float,
                       seed: int) -> tuple[list[dict], list[dict], int]:
    """Keep a seeded fraction ``rate`` of each user's training samples (see module doc)."""
    if not 0 < rate <= 1:
        raise ValueError(f"--history-rate must be in (0, 1], got {rate}")
    if rate == 1:
        return train, seen_test, 0
    by_user: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(train):
        by_user[s["user_id"]].append(i)
    keep: set[int] = set()
    for user in sorted(by_user):
        idx = by_user[user]
        # One generator per user: a user's choice does not depend on the other users.
        rng = random.Random(f"{seed}:{user}")
        keep.update(rng.sample(idx, max(1, round(rate * len(idx)))))
    dropped = {(s["user_id"], s["id"]) for i, s in enumerate(train) if i not in keep}

    def thin(s: dict) -> dict:
        return {**s, "history": [h for h in s["history"] if (s["user_id"], h["id"]) not in dropped]}

    kept = [thin(s) for i, s in enumerate(train) if i in keep]
    return kept, [thin(s) for s in seen_test], len(dropped)


def split_validation(train: list[dict], per_user: int) -> tuple[list[dict], list[dict]]:
    """(train without the validation answers, seen_val): each user's ``per_user`` latest questions.

    ``train`` is in time order per user (stage 01's loaders sort it), so the latest
    questions are the last ones of the user with ``source == "question"``.
    """
    if per_user < 0:
        raise ValueError(f"--val-questions must be >= 0, got {per_user}")
    questions: dict[str, list[dict]] = defaultdict(list)
    for s in train:
        if s.get("source", "question") == "question":
            questions[s["user_id"]].append(s)
    val = [s for user in questions for s in (questions[user][-per_user:] if per_user else [])]
    val_ids = {(s["user_id"], s["id"]) for s in val}
    val_golds = {(s["user_id"], s["output"]) for s in val}

    def held_out(user: str, item: dict) -> bool:
        return (user, item["id"]) in val_ids or (user, item["output"]) in val_golds

    kept = [{**s, "history": [h for h in s["history"] if not held_out(s["user_id"], h)]}
            for s in train if not held_out(s["user_id"], s)]
    return kept, val


def _bm25_similarity(sample: dict, query: str) -> float:
    docs = [item_text(h) for h in sample["history"]]
    if not docs:
        return 0.0
    # The query scored against itself (added as a document) is the scale that makes
    # users with long and short queries comparable.
    scores = BM25(docs + [query]).scores(query)
    return float(scores[:-1].mean() / scores[-1]) if scores[-1] > 0 else 0.0


def user_similarity(seen_test: list[dict], by: str = "bm25", encoder: Any = None,
                    batch_size: int = 64, query: Query = sample_input) -> dict[str, float]:
    """Mean normalized similarity of each user's test inputs to their own history."""
    choose("cluster similarity", by, {"bm25": 0, "dense": 0})
    per_sample: dict[str, list[float]] = defaultdict(list)
    if by == "dense":
        if encoder is None:
            from data_process.dense import shared_encoder

            encoder = shared_encoder()
        texts = [query(s) for s in seen_test] + [item_text(h) for s in seen_test for h in s["history"]]
        vec = dense_vectors(texts, encoder, batch_size)
    for s in tqdm(seen_test, desc="user similarity", leave=False):
        if by == "bm25":
            sim = _bm25_similarity(s, query(s))
        else:
            docs = [vec[item_text(h)] for h in s["history"]]
            sim = float(np.mean(np.stack(docs) @ vec[query(s)])) if docs else 0.0
        per_sample[s["user_id"]].append(sim)
    return {u: round(float(np.mean(v)), 6) for u, v in sorted(per_sample.items())}


def cluster_users(similarity: dict[str, float]) -> list[list[str]]:
    """Three equal groups, most similar first; ties broken by user id."""
    ranked = sorted(similarity, key=lambda u: (-similarity[u], u))
    return [sorted(group.tolist()) for group in np.array_split(np.array(ranked, dtype=object), 3)]


def build_splits(bench: Benchmark, *, num_users: int, num_unseen: int, min_history: int, min_train: int,
                 seed: int, history_rate: float = 1.0, clusters: bool = False, cluster_by: str = "bm25",
                 encoder: Any = None, query: Query = sample_input, val_questions: int = 0) -> Splits:
    """All split files of stage 01 from a loaded benchmark."""
    seen, unseen = select_users(bench, num_users=num_users, num_unseen=num_unseen,
                                min_history=min_history, min_train=min_train, seed=seed)
    seen_set, unseen_set = set(seen), set(unseen)
    train = [s for s in bench.train if s["user_id"] in seen_set]
    seen_test = [s for s in bench.test if s["user_id"] in seen_set]
    # Validation first: the held-out answers do not depend on the sparsity setting.
    train, seen_val = split_validation(train, val_questions)
    train, seen_test, dropped = apply_history_rate(train, seen_test, history_rate, seed)
    files = {"train": train, **({"seen_val": seen_val} if val_questions else {}), "seen_test": seen_test,
             "unseen_test": [s for s in bench.test if s["user_id"] in unseen_set],
             "remain_train": [s for s in bench.train if s["user_id"] not in seen_set]}
    out = Splits(files=files, seen_users=seen, unseen_users=unseen, dropped=dropped)
    if clusters:
        out.user_similarity = user_similarity(seen_test, cluster_by, encoder, query=query)
        out.clusters = cluster_users(out.user_similarity)
        for k, group in enumerate(out.clusters):
            members = set(group)
            files[f"seen_test_cluster{k}"] = [s for s in seen_test if s["user_id"] in members]
    return out


def _distribution(lengths: list[int]) -> str:
    if not lengths:
        return "-"
    return (f"min {min(lengths)} median {statistics.median(lengths):g} "
            f"mean {statistics.fmean(lengths):.1f} max {max(lengths)}")


def summary(splits: Splits) -> str:
    """Human-readable summary: users, samples per split, history lengths."""
    lines = [f"users: {len(splits.seen_users)} seen, {len(splits.unseen_users)} unseen"]
    for name, samples in splits.files.items():
        users = len({s["user_id"] for s in samples})
        lines.append(f"  {name:<20} {len(samples):>6} samples {users:>4} users  history length: "
                     f"{_distribution([len(s['history']) for s in samples])}")
    if splits.dropped:
        lines.append(f"sparsity: dropped {splits.dropped} training samples of seen users")
    for k, group in enumerate(splits.clusters):
        sims = [splits.user_similarity[u] for u in group] or [0.0]
        lines.append(f"cluster {k}: {len(group)} users, similarity {min(sims):.3f}..{max(sims):.3f}")
    return "\n".join(lines)
