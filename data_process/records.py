"""What every benchmark loader shares (the loaders themselves live in ``tasks/``).

A task's loader maps its raw files to normalized samples (``data_process.schema``) and
returns a :class:`Benchmark`.  Shared here:

* :class:`ErrorLog` -- bad input handling.  ``on_error="stop"`` (default) gathers every
  problem of the files and then raises one ``ValueError`` listing them, before any stage
  writes anything; ``on_error="skip"`` reports each bad record, skips it and keeps the
  messages in ``Benchmark.errors`` (a stage counts them in its manifest).
* field helpers (:func:`need_str`, :func:`need_id`, :func:`need_list`) whose messages name
  the file, the record (id or position) and the field;
* :func:`read_samples` -- a stage's sample JSONL, validated;
* :func:`assemble` -- the leakage rule and history-item promotion, the same for every task:
  no sample sees its own output or any of its user's test golds in its history, and a
  history item promoted to a training sample only sees the items before it.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_process.config import choose
from data_process.schema import make_sample, validate_sample

log = logging.getLogger(__name__)

ON_ERROR = ("stop", "skip")


@dataclass
class Benchmark:
    """A loaded benchmark: training and test samples plus the bad records that were skipped."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)


class BadRecord(ValueError):
    """One bad record; the message names file, record and field."""


class ErrorLog:
    """Collects bad-record messages; raises them all at the end unless skipping."""

    def __init__(self, on_error: str, source: str | Path):
        choose("on_error mode", on_error, {m: m for m in ON_ERROR})
        self.on_error = on_error
        self.source = str(source)
        self.errors: list[str] = []

    def report(self, message: str) -> None:
        self.errors.append(message)
        if self.on_error == "skip":
            log.warning("skipping bad record: %s", message)

    def check(self) -> None:
        """Raise (stop mode) when anything was reported."""
        if self.errors and self.on_error == "stop":
            shown = "\n  ".join(self.errors[:20])
            more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
            raise ValueError(f"{len(self.errors)} bad record(s) in {self.source}:\n  {shown}{more}\n"
                             "Fix them, or pass --on-error skip to report and skip bad records.")


def need(record: Any, key: str, kinds: tuple[type, ...], where: str) -> Any:
    """``record[key]`` if present and of one of ``kinds``; else :class:`BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record or record[key] is None:
        raise BadRecord(f"{where}: missing field {key!r}")
    value = record[key]
    # bool is an int subclass; an id or text of true/false is always a mistake.
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BadRecord(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def need_str(record: Any, key: str, where: str) -> str:
    return need(record, key, (str,), where)


def need_id(record: Any, key: str, where: str) -> str:
    """Ids may be strings or integers in the raw files; samples always carry strings."""
    return str(need(record, key, (str, int), where))


def need_list(record: Any, key: str, where: str, *, non_empty: bool = False) -> list:
    value = need(record, key, (list,), where)
    if non_empty and not value:
        raise BadRecord(f"{where}: field {key!r} is empty (a user needs at least one history item)")
    return value


def history_items(profile: list, where: str, read_item: Callable[[Any, str], dict]) -> list[dict]:
    """Map raw profile items with ``read_item``; duplicate item ids are an error."""
    items, seen = [], set()
    for j, raw in enumerate(profile):
        item = read_item(raw, f"{where} profile[{j}]")
        if item["id"] in seen:
            raise BadRecord(f"{where} profile[{j}]: duplicate history id {item['id']!r}")
        seen.add(item["id"])
        items.append(item)
    return items


def _strip(history: list[dict], own_id: str, banned_ids: set[str], banned_outputs: set[str]) -> list[dict]:
    return [h for h in history
            if h["id"] != own_id and h["id"] not in banned_ids and h["output"] not in banned_outputs]


def assemble(train: list[dict], test: list[dict], *, include_history_samples: bool,
             instruction: Callable[[str], str]) -> tuple[list[dict], list[dict]]:
    """Apply the leakage rule and (optionally) promote history items to training samples.

    ``train`` / ``test`` are samples whose ``history`` is the raw profile (time order).
    A history item is dropped from a sample's history when it is the sample itself (same
    id), one of the user's test questions (by id), or carries the sample's own output or
    one of the user's test golds (same text).  Promoted items get ``instruction(item
    input)`` as input, ``source="history"``, and the user's earlier items as history.
    """
    test_ids, test_golds = defaultdict(set), defaultdict(set)
    for s in test:
        test_ids[s["user_id"]].add(s["id"])
        if s["output"].strip():
            test_golds[s["user_id"]].add(s["output"])
    question_ids = defaultdict(set)
    for s in train + test:
        question_ids[s["user_id"]].add(s["id"])

    def clean(s: dict, history: list[dict]) -> list[dict]:
        user = s["user_id"]
        return _strip(history, s["id"], test_ids[user], test_golds[user] | {s["output"]})

    out_train = [{**s, "history": clean(s, s["history"])} for s in train]
    out_test = [{**s, "history": clean(s, s["history"])} for s in test]
    if include_history_samples:
        out_train += _promote(train + test, question_ids, test_ids, test_golds, instruction, clean)
    _check_unique_ids(out_train + out_test)
    return _time_sorted(out_train, train + test), out_test


def _timelines(samples: list[dict]) -> dict[str, list[dict]]:
    """Each user's history items in time order: profiles merged, first appearance wins."""
    timeline: dict[str, list[dict]] = defaultdict(list)
    seen: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        for item in s["history"]:
            if item["id"] not in seen[s["user_id"]]:
                seen[s["user_id"]].add(item["id"])
                timeline[s["user_id"]].append(item)
    return timeline


def _promote(samples, question_ids, test_ids, test_golds, instruction, clean) -> list[dict]:
    promoted = []
    for user, items in _timelines(samples).items():
        for j, item in enumerate(items):
            # Questions are samples already; test items and items carrying a test gold
            # must never become training targets.
            if (item["id"] in question_ids[user] or item["id"] in test_ids[user]
                    or item["output"] in test_golds[user]):
                continue
            extra = {k: v for k, v in item.items() if k not in ("id", "input", "output")}
            sample = make_sample(item["id"], user, instruction(item["input"]), item["output"],
                                 [], source="history", **extra)
            sample["history"] = clean(sample, items[:j])
            promoted.append(sample)
    return promoted


def _time_sorted(train: list[dict], raw: list[dict]) -> list[dict]:
    """Users in first-appearance order, each user's samples in time order."""
    timeline = _timelines(raw)
    position = {(u, item["id"]): j for u, items in timeline.items() for j, item in enumerate(items)}
    users = list(dict.fromkeys(s["user_id"] for s in raw + train))
    rank = {u: i for i, u in enumerate(users)}

    def key(pair: tuple[int, dict]) -> tuple[int, int, int]:
        i, s = pair
        # Questions never seen in a later profile come after the user's known items.
        return rank[s["user_id"]], position.get((s["user_id"], s["id"]), 1 << 30), i

    return [s for _, s in sorted(enumerate(train), key=key)]


def _check_unique_ids(samples: list[dict]) -> None:
    owner: dict[str, str] = {}
    for s in samples:
        if s["id"] in owner:
            raise ValueError(f"duplicate sample id {s['id']!r} (users {owner[s['id']]!r} and "
                             f"{s['user_id']!r}): history item ids must be unique across users")
        owner[s["id"]] = s["user_id"]


def read_samples(path: str | Path, log: ErrorLog) -> list[dict[str, Any]]:
    """Read and validate a stage's sample JSONL; bad lines and duplicate ids go to ``log``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    samples, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                validate_sample(record, where)
                if record["id"] in seen:
                    raise BadRecord(f"{where}: record {record['id']!r}: duplicate id")
            except json.JSONDecodeError as err:
                log.report(f"{where}: malformed JSON ({err.msg})")
                continue
            except ValueError as err:
                log.report(str(err))
                continue
            seen.add(record["id"])
            samples.append(record)
    return samples
