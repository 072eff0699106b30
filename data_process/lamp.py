"""LaMP-4 news headline generation, time-based split.

Files in ``data_dir``: ``train_questions.json`` and ``dev_questions.json`` (lists of
``{id, input, user_id, profile:[{id, title, text, date?}]}``) and ``train_outputs.json``
and ``dev_outputs.json`` (``{task, golds:[{id, output}]}``).  Train questions become
training samples, dev questions test samples.  A profile item's article (``text``) is the
history input and its ``title`` the history output; a history item promoted to a training
sample gets the input ``"Generate a headline for the following article: <text>"``.

Only the time-based split carries ``user_id`` (the user-based split holds different users
in train and dev, which Fints cannot use); files without it are rejected with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_process.artifacts import read_json
from data_process.loaders import (BadRecord, Benchmark, ErrorLog, assemble, history_items, need_id,
                                  need_list, need_str)
from data_process.schema import make_sample

INSTRUCTION = "Generate a headline for the following article: "
NO_USER_ID = ("Fints needs the LaMP-4 time-based split (LaMP_4 'time' files), "
              "where every question names its user and users appear in both train and dev; "
              "the user-based split lacks user_id")


def headline_instruction(article: str) -> str:
    """The LaMP-4 question input for an article."""
    return INSTRUCTION + article


def _read_item(raw: Any, where: str) -> dict:
    item_id = need_id(raw, "id", where)
    where = f"{where} (id {item_id!r})"
    item = {"id": item_id, "input": need_str(raw, "text", where), "output": need_str(raw, "title", where)}
    if isinstance(raw.get("date"), str):
        item["date"] = raw["date"]
    return item


def _read_golds(path: Path, log: ErrorLog) -> dict[str, str]:
    raw = read_json(path)
    try:
        golds = need_list(raw, "golds", str(path))
    except BadRecord as err:
        raise ValueError(str(err)) from None
    out: dict[str, str] = {}
    for i, gold in enumerate(golds):
        where = f"{path}: golds[{i}]"
        try:
            gid = need_id(gold, "id", where)
            text = need_str(gold, "output", f"{where} (id {gid!r})")
            if gid in out:
                raise BadRecord(f"{where}: duplicate id {gid!r}")
        except BadRecord as err:
            log.report(str(err))
            continue
        out[gid] = text
    return out


def _read_split(data_dir: Path, split: str, log: ErrorLog, seen_ids: set[str]) -> list[dict]:
    q_path, o_path = data_dir / f"{split}_questions.json", data_dir / f"{split}_outputs.json"
    questions, golds = read_json(q_path), _read_golds(o_path, log)
    if not isinstance(questions, list):
        raise ValueError(f"{q_path}: expected a JSON list of questions, got {type(questions).__name__}")
    if questions and not any(isinstance(q, dict) and "user_id" in q for q in questions):
        raise ValueError(f"{q_path}: the questions have no 'user_id': {NO_USER_ID}")
    samples, asked = [], set()
    for i, q in enumerate(questions):
        where = f"{q_path}: record {i}"
        try:
            qid = need_id(q, "id", where)
            where = f"{q_path}: record {i} (id {qid!r})"
            asked.add(qid)
            if isinstance(q, dict) and "user_id" not in q:
                raise BadRecord(f"{where}: missing field 'user_id': {NO_USER_ID}")
            user = need_id(q, "user_id", where)
            text = need_str(q, "input", where)
            profile = need_list(q, "profile", where, non_empty=True)
            history = history_items(profile, where, _read_item)
            if qid in seen_ids:
                raise BadRecord(f"{where}: duplicate question id {qid!r}")
            if qid not in golds:
                raise BadRecord(f"{where}: no gold output with this id in {o_path}")
        except BadRecord as err:
            log.report(str(err))
            continue
        seen_ids.add(qid)
        samples.append(make_sample(qid, user, text, golds[qid], history, source="question"))
    for gid in golds:
        if gid not in asked:
            log.report(f"{o_path}: output id {gid!r} has no question in {q_path}")
    return samples


def load_lamp4(data_dir: str | Path, *, include_history_samples: bool = True,
               on_error: str = "stop") -> Benchmark:
    """Load the LaMP-4 time-based files of ``data_dir`` as a :class:`Benchmark`."""
    data_dir = Path(data_dir)
    log = ErrorLog(on_error, data_dir)
    seen: set[str] = set()
    train = _read_split(data_dir, "train", log, seen)
    test = _read_split(data_dir, "dev", log, seen)
    log.check()
    train, test = assemble(train, test, include_history_samples=include_history_samples,
                           instruction=headline_instruction)
    return Benchmark(train=train, test=test, errors=log.errors)
