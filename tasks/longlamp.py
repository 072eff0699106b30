"""LongLaMP: personalized abstract generation (temporal setting).

Files in ``data_dir``: a training split ``train.*`` and a test split ``test.*`` (or, when
there is no test file, ``dev.*`` / ``val.*``), each JSON (a list of records), JSONL (one
record a line) or parquet.  A record is
``{name, id?, input, output, profile:[{id, title, abstract}]}``.

The user is identified by ``name`` (in LongLaMP the author; in the shared Debian data the
hashed maintainer id, which is also the prefix of every record and profile id).  A record
without ``id`` gets ``<split>-<line>``.  A profile item's ``title`` is the history input
and its ``abstract`` the history output; a history item promoted to a training sample gets
the input ``'Generate an abstract for the title "<title>".'``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_process.records import (BadRecord, Benchmark, ErrorLog, assemble, history_items, need_id, need_list,
                                  need_str)
from data_process.schema import make_sample
from tasks.base import TextTask

SUFFIXES = (".jsonl", ".json", ".parquet")
TEST_NAMES = ("test", "dev", "val")
_ASK = re.compile(r'^\s*generate an abstract for the title\s*"(.*)"\s*\.?\s*$', re.IGNORECASE | re.DOTALL)


def abstract_instruction(title: str) -> str:
    """The LongLaMP question input for a paper title."""
    return f'Generate an abstract for the title "{title}".'


def title(text: str) -> str:
    """The title of a LongLaMP input (``Generate an abstract for the title "X".`` -> X)."""
    match = _ASK.match(text)
    return (match.group(1) if match else text).strip()


def find_split(data_dir: Path, names: tuple[str, ...]) -> Path:
    """The first ``<name><suffix>`` file that exists; else a FileNotFoundError listing them."""
    tried = [data_dir / f"{n}{s}" for n in names for s in SUFFIXES]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(f"{data_dir}: no LongLaMP split file; looked for "
                            f"{', '.join(p.name for p in tried)}")


def read_records(path: Path, log: ErrorLog) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) for a JSON, JSONL or parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}: row {i}", rec
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}: record {i}", rec
    else:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as err:
                    log.report(f"{path}:{number}: malformed JSON ({err.msg})")


def _read_item(raw: Any, where: str) -> dict:
    item_id = need_id(raw, "id", where)
    where = f"{where} (id {item_id!r})"
    return {"id": item_id, "input": need_str(raw, "title", where),
            "output": need_str(raw, "abstract", where)}


def _read_split(path: Path, split: str, log: ErrorLog, seen: set[str]) -> list[dict]:
    samples = []
    for i, (where, rec) in enumerate(read_records(path, log)):
        try:
            # Parquet stores an absent id as null.
            has_id = isinstance(rec, dict) and rec.get("id") is not None
            rid = need_id(rec, "id", where) if has_id else f"{split}-{i}"
            where = f"{where} (id {rid!r})"
            user = need_id(rec, "name", where)
            text, gold = need_str(rec, "input", where), need_str(rec, "output", where)
            history = history_items(need_list(rec, "profile", where, non_empty=True), where, _read_item)
            if rid in seen:
                raise BadRecord(f"{where}: duplicate record id {rid!r}")
        except BadRecord as err:
            log.report(str(err))
            continue
        seen.add(rid)
        samples.append(make_sample(rid, user, text, gold, history, source="question"))
    return samples


class LongLamp(TextTask):
    name = "longlamp"
    summary = "LongLaMP abstract generation"
    defaults = {"include_history_samples": True, "history_k": 3, "max_new_tokens": 256, "threshold": 0.2}
    header = "Abstracts this author wrote for earlier papers:"

    def load(self, data_dir: Path, *, include_history_samples: bool = True, on_error: str = "stop") -> Benchmark:
        return load_longlamp(data_dir, include_history_samples=include_history_samples, on_error=on_error)

    def query(self, sample: dict[str, Any]) -> str:
        return title(sample["input"])

    def question(self, text: str) -> str:
        return f'Generate an abstract for the title "{title(text)}".\nWrite only the abstract.'

    def item(self, short: str, long: str) -> str:
        return f'Abstract: "{long}" for title: "{short}"'

    def fields(self, item: dict[str, Any]) -> tuple[str, str]:
        return title(item["input"]), item["output"].strip()


TASK = LongLamp()


def load_longlamp(data_dir: str | Path, *, include_history_samples: bool = True,
                  on_error: str = "stop") -> Benchmark:
    """Load LongLaMP abstract-generation files of ``data_dir`` as a :class:`Benchmark`."""
    data_dir = Path(data_dir)
    log = ErrorLog(on_error, data_dir)
    train_path, test_path = find_split(data_dir, ("train",)), find_split(data_dir, TEST_NAMES)
    seen: set[str] = set()
    train = _read_split(train_path, "train", log, seen)
    test = _read_split(test_path, test_path.stem, log, seen)
    log.check()
    train, test = assemble(train, test, include_history_samples=include_history_samples,
                           instruction=abstract_instruction)
    return Benchmark(train=train, test=test, errors=log.errors)
