"""From raw questions to samples: time order, one sample per real item, per-user ids, leakage.

:func:`assemble` is the same for every text benchmark.  Its input is the loader's train
and test samples whose ``history`` is the raw profile; it returns the final samples and
counts of what it did (``Benchmark.stats``).  The rules, in order:

1. **Time order** -- every profile is sorted by its items' dates (:mod:`data_process.timeline`:
   stable, undated items keep their place); ``unsorted_profiles`` counts profiles whose
   order changed.
2. **One sample per real item** -- within one user, items with the same input and output
   (whitespace aside) are one item: a question that reappears in a profile under another
   id takes the question's id there, and an item repeated under several ids keeps the
   first.  ``merged_duplicates`` counts the ids folded away.
3. **Ids scoped per user** -- an id used by several users (a co-authored paper, a LaMP
   profile id that is not unique) becomes ``<user>/<id>`` in every user except the one
   whose question carries it.  ``shared_ids`` counts such ids.
4. **Leakage** -- no sample sees its own item or output, nor any of its user's test
   questions or golds; a *test* sample also never sees any other user's test gold, so a
   co-authored test paper cannot reach a test prompt through a co-author's history.  A
   co-author's *training* data may still hold that paper (it is their own history, and
   pairs, vectors and retrieval are per user, so it never reaches the tested user).
5. **Promotion** (``include_history_samples``) -- every history item that is no question
   and carries no test gold of its user becomes a training sample (``source="history"``)
   whose history is the user's items *strictly earlier* than it (same date: not seen).
   Its input is the input of a real question about the same item when one exists (any
   user: a LongLaMP question carries its "using the following items" clause), else
   ``instruction(item input)``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from data_process.schema import make_sample
from data_process.timeline import earlier_than, sort_by_time, time_keys

Sample = dict[str, Any]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _key(text_in: str, text_out: str) -> tuple[str, str]:
    return _norm(text_in), _norm(text_out)


def assemble(train: list[Sample], test: list[Sample], *, include_history_samples: bool,
             instruction: Callable[[str], str], content: Callable[[str], str] = lambda text: text,
             ) -> tuple[list[Sample], list[Sample], dict[str, int]]:
    """Final train and test samples and the counts of what was done (see the module rules).

    ``instruction`` poses a history item's input as a question input; ``content`` maps a
    question input back to the item input it is about (the article, the title).
    """
    stats = Counter(profiles=0, unsorted_profiles=0, merged_duplicates=0, shared_ids=0)
    samples = [_time_sorted_history(s, stats) for s in train + test]
    alias = _duplicates(samples, content, stats)
    samples = [_renamed(s, alias.get(s["user_id"], {})) for s in samples]
    samples = _scope_ids(samples, stats)
    train, test = samples[:len(train)], samples[len(train):]
    rule = _Leakage(test)
    out_train = [{**s, "history": rule.clean(s, s["history"])} for s in train]
    out_test = [{**s, "history": rule.clean(s, s["history"], test=True)} for s in test]
    timelines = _timelines(samples)
    if include_history_samples:
        asked = {_key(content(s["input"]), s["output"]): s["input"] for s in samples}
        out_train += _promote(timelines, {(s["user_id"], s["id"]) for s in samples}, rule, asked, instruction)
    _check_unique_ids(out_train + out_test)
    return _in_time_order(out_train, samples, timelines), out_test, dict(stats)


def _time_sorted_history(s: Sample, stats: Counter) -> Sample:
    history, moved = sort_by_time(s["history"])
    stats["profiles"] += 1
    stats["unsorted_profiles"] += moved
    return {**s, "history": history}


def _duplicates(samples: list[Sample], content: Callable[[str], str], stats: Counter) -> dict[str, dict[str, str]]:
    """Per user: item id -> the id of the question or earlier item with the same text."""
    first: dict[tuple[str, tuple[str, str]], str] = {}
    for s in samples:
        first.setdefault((s["user_id"], _key(content(s["input"]), s["output"])), s["id"])
    alias: dict[str, dict[str, str]] = defaultdict(dict)
    for s in samples:
        user = s["user_id"]
        for h in s["history"]:
            target = first.setdefault((user, _key(h["input"], h["output"])), h["id"])
            if target != h["id"] and h["id"] not in alias[user]:
                alias[user][h["id"]] = target
                stats["merged_duplicates"] += 1
    return alias


def _renamed(s: Sample, rename: dict[str, str]) -> Sample:
    """``s`` with history ids renamed and repeated items (same id) dropped, first kept."""
    history, seen = [], set()
    for h in s["history"]:
        h = {**h, "id": rename.get(h["id"], h["id"])}
        if h["id"] not in seen:
            seen.add(h["id"])
            history.append(h)
    return {**s, "history": history}


def _scope_ids(samples: list[Sample], stats: Counter) -> list[Sample]:
    """Ids used by several users become ``<user>/<id>``, except in the user whose question it is."""
    owners: dict[str, set[str]] = defaultdict(set)
    asked_by: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        owners[s["id"]].add(s["user_id"])
        asked_by[s["id"]].add(s["user_id"])
        for h in s["history"]:
            owners[h["id"]].add(s["user_id"])
    shared = {i for i, users in owners.items() if len(users) > 1}
    stats["shared_ids"] += len(shared)
    if not shared:
        return samples
    keep = {i: next(iter(asked_by[i])) for i in shared if len(asked_by[i]) == 1}

    def scoped(item_id: str, user: str) -> str:
        return f"{user}/{item_id}" if item_id in shared and keep.get(item_id) != user else item_id

    return [{**s, "id": scoped(s["id"], s["user_id"]),
             "history": [{**h, "id": scoped(h["id"], s["user_id"])} for h in s["history"]]} for s in samples]


class _Leakage:
    """What a sample may not see: rule 4 of the module docstring."""

    def __init__(self, test: list[Sample]):
        self.test_ids: dict[str, set[str]] = defaultdict(set)
        self.test_golds: dict[str, set[str]] = defaultdict(set)
        for s in test:
            self.test_ids[s["user_id"]].add(s["id"])
            if s["output"].strip():
                self.test_golds[s["user_id"]].add(_norm(s["output"]))
        self.all_test_golds = set().union(*self.test_golds.values())

    def is_test_item(self, user: str, item: Sample) -> bool:
        return item["id"] in self.test_ids[user] or _norm(item["output"]) in self.test_golds[user]

    def clean(self, s: Sample, history: list[Sample], test: bool = False) -> list[Sample]:
        user, own = s["user_id"], _norm(s["output"])
        banned = self.all_test_golds if test else self.test_golds[user]
        return [h for h in history if h["id"] != s["id"] and not self.is_test_item(user, h)
                and _norm(h["output"]) != own and _norm(h["output"]) not in banned]


def _timelines(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Each user's history items, profiles merged (first appearance wins), in time order."""
    timeline: dict[str, list[Sample]] = defaultdict(list)
    seen: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        for item in s["history"]:
            if item["id"] not in seen[s["user_id"]]:
                seen[s["user_id"]].add(item["id"])
                timeline[s["user_id"]].append(item)
    return {user: sort_by_time(items)[0] for user, items in timeline.items()}


def _promote(timelines: dict[str, list[Sample]], questions: set[tuple[str, str]], rule: _Leakage,
             asked: dict[tuple[str, str], str], instruction: Callable[[str], str]) -> list[Sample]:
    promoted = []
    for user, items in timelines.items():
        keys = time_keys(items)
        for j, item in enumerate(items):
            # Questions are samples already; test items must never become training targets.
            if (user, item["id"]) in questions or rule.is_test_item(user, item):
                continue
            extra = {k: v for k, v in item.items() if k not in ("id", "input", "output")}
            question = asked.get(_key(item["input"], item["output"])) or instruction(item["input"])
            sample = make_sample(item["id"], user, question, item["output"], [], source="history", **extra)
            sample["history"] = rule.clean(sample, earlier_than(items, keys, j))
            promoted.append(sample)
    return promoted


def _in_time_order(train: list[Sample], raw: list[Sample], timelines: dict[str, list[Sample]]) -> list[Sample]:
    """Users in first-appearance order, each user's samples in time order."""
    position = {(u, item["id"]): j for u, items in timelines.items() for j, item in enumerate(items)}
    rank = {u: i for i, u in enumerate(dict.fromkeys(s["user_id"] for s in raw + train))}

    def key(pair: tuple[int, Sample]) -> tuple[int, int, int]:
        i, s = pair
        # Questions never seen in a profile come after the user's known items.
        return rank[s["user_id"]], position.get((s["user_id"], s["id"]), 1 << 30), i

    return [s for _, s in sorted(enumerate(train), key=key)]


def _check_unique_ids(samples: list[Sample]) -> None:
    owner: dict[str, str] = {}
    for s in samples:
        if s["id"] in owner:
            raise ValueError(f"duplicate sample id {s['id']!r} (users {owner[s['id']]!r} and {s['user_id']!r})")
        owner[s["id"]] = s["user_id"]
