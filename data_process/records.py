"""What every benchmark loader shares (the loaders themselves live in ``tasks/``).

A task's loader maps its raw files to normalized samples (``data_process.schema``) and
returns a :class:`Benchmark`.  Shared here:

* :class:`ErrorLog` -- bad input handling.  ``on_error="stop"`` (default) gathers every
  problem of the files and then raises one ``ValueError`` listing them, before any stage
  writes anything; ``on_error="skip"`` reports each bad record, skips it and keeps the
  messages in ``Benchmark.errors`` (a stage counts them in its manifest).
* field helpers (:func:`need_str`, :func:`need_id`, :func:`need_list`) whose messages name
  the file, the record (id or position) and the field;
* :func:`read_samples` -- a stage's sample JSONL, validated.

Time order, duplicate merging, per-user ids, the leakage rule and history-item promotion
are :func:`data_process.assemble.assemble`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_process.artifact_io import check_finished, read_text
from data_process.config import choose
from data_process.schema import validate_sample

log = logging.getLogger(__name__)

ON_ERROR = ("stop", "skip")


@dataclass
class Benchmark:
    """A loaded benchmark: training and test samples plus the bad records that were skipped."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)
    layout: str = ""  # which file layout the loader found (said in stage 01's summary)
    # What loading did: profiles (unsorted_profiles), merged_duplicates, shared_ids, ...
    stats: dict[str, int] = field(default_factory=dict)


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
        """Raise (stop mode) when anything was reported: one line for one bad record."""
        if len(self.errors) == 1 and self.on_error == "stop":
            raise ValueError(f"{self.errors[0]} (fix it, or pass --on-error skip to report and skip bad records)")
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


def check_not_empty(samples: list, source: str | Path, what: str) -> None:
    """An empty split is an error naming its file: it could select no user, score nothing."""
    if not samples:
        raise ValueError(f"{source}: no {what} (the file holds none)")


class UserIds:
    """The user ids of a benchmark's files, read with :func:`need_id` but kept apart by JSON type.

    Samples carry string ids, so a raw ``123`` and ``"123"`` would silently become one
    user.  Which user was meant cannot be known, so no record can be skipped to fix it:
    the stage stops (whatever ``--on-error``) naming both records.
    """

    def __init__(self) -> None:
        self.first: dict[str, tuple[type, str]] = {}

    def read(self, record: Any, key: str, where: str) -> str:
        user = need_id(record, key, where)
        kind = type(record[key])
        first_kind, first_where = self.first.setdefault(user, (kind, where))
        if kind is not first_kind:
            raise ValueError(f"{where}: field {key!r} is {record[key]!r} ({kind.__name__}) but {first_where} has "
                            f"{user!r} as {first_kind.__name__}: an integer and a string id would merge two users; "
                            "write every id of a user the same way")
        return user


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


def read_samples(path: str | Path, log: ErrorLog) -> list[dict[str, Any]]:
    """Read and validate a finished stage's sample JSONL; bad lines and duplicate ids go to
    ``log``; a file changed since its stage's manifest recorded it is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    samples, seen, reported = [], set(), len(log.errors)
    for number, line in enumerate(read_text(path).split("\n"), start=1):
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
    if len(log.errors) == reported:  # a bad line is named above; a valid edit only by its checksum
        check_finished(path)
    return samples
