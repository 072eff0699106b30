"""The LaMP tasks' shared shape (LaMP-4 headlines, LaMP-5 titles): file layout and prompt.

Files in ``data_dir``: ``train_questions.json`` and ``dev_questions.json`` (lists of
``{id, input, user_id, profile:[{id, <input field>, <output field>, date?}]}``) and
``train_outputs.json`` and ``dev_outputs.json`` (``{task, golds:[{id, output}]}``).  Train
questions become training samples, dev questions test samples.  A profile item's input
field (LaMP-4 ``text``, LaMP-5 ``abstract``) is the history input and its output field
(``title``) the history output; a history item promoted to a training sample is posed
with the task's instruction.

Only the time-based split carries ``user_id`` (the user-based split holds different users
in train and dev, which Fints cannot use); files without it are rejected with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from data_process.artifacts import read_json
from data_process.records import (BadRecord, Benchmark, ErrorLog, assemble, history_items, need_id, need_list,
                                  need_str)
from data_process.schema import make_sample
from tasks.base import TextTask

NO_USER_ID = ("Fints needs the LaMP time-based split ('time' files), where every question "
              "names its user and users appear in both train and dev; the user-based split lacks user_id")
_ANSWER_LABEL = re.compile(r"^[\s*#]*(?:headline|title|answer)[\s*]*:[\s*]*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`*"


@dataclass(frozen=True)
class LampLayout:
    """Which profile fields a LaMP task reads, and how it poses a history item as a question."""

    input_field: str                   # profile item field that is the history input
    output_field: str                  # profile item field that is the history output
    instruction: Callable[[str], str]  # history input -> question input


class LampTask(TextTask):
    """A LaMP task: a one-line answer (headline, title) the user wrote for a long text.

    Subclasses name the instruction (``"Generate a headline for the following article: "``),
    the answer (``"headline"``), the text (``"article"``) and the profile fields.
    """

    instruction: ClassVar[str]
    answer_name: ClassVar[str]
    text_name: ClassVar[str]
    input_field: ClassVar[str]
    output_field: ClassVar[str] = "title"

    def __init__(self) -> None:
        self._ask = re.compile(r"^\s*" + re.escape(self.instruction.strip().rstrip(":")) + r"\s*:\s*",
                               re.IGNORECASE)
        self.layout = LampLayout(self.input_field, self.output_field, lambda text: self.instruction + text)

    def text(self, sample_input: str) -> str:
        """The long text of an input (the instruction prefix removed when present)."""
        return self._ask.sub("", sample_input, count=1).strip()

    def load(self, data_dir: Path, *, include_history_samples: bool = True, on_error: str = "stop") -> Benchmark:
        return load_lamp(data_dir, self.layout, include_history_samples=include_history_samples, on_error=on_error)

    def query(self, sample: dict[str, Any]) -> str:
        return self.text(sample["input"])

    def question(self, text: str) -> str:
        return f"{self.instruction}{self.text(text)}\nWrite only the {self.answer_name}."

    def item(self, short: str, long: str) -> str:
        return f'{self.answer_name.capitalize()}: "{short}" for {self.text_name}: "{long}"'

    def fields(self, item: dict[str, Any]) -> tuple[str, str]:
        return item["output"].strip(), self.text(item["input"])

    def postprocess(self, text: str) -> str:
        return one_line_answer(text or "")


def one_line_answer(text: str) -> str:
    """The first non-empty line without a "Headline:"/"Title:" label or quotes."""
    for line in text.splitlines():
        line = _ANSWER_LABEL.sub("", line.strip(), count=1).strip().strip(_QUOTES).strip()
        if line:  # a bare "Headline:" line is followed by the headline itself
            return line
    return ""


def _item_reader(layout: LampLayout) -> Callable[[Any, str], dict]:
    def read_item(raw: Any, where: str) -> dict:
        item_id = need_id(raw, "id", where)
        where = f"{where} (id {item_id!r})"
        item = {"id": item_id, "input": need_str(raw, layout.input_field, where),
                "output": need_str(raw, layout.output_field, where)}
        if isinstance(raw.get("date"), str):
            item["date"] = raw["date"]
        return item
    return read_item


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


def _read_split(data_dir: Path, split: str, layout: LampLayout, log: ErrorLog, seen_ids: set[str]) -> list[dict]:
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
            history = history_items(profile, where, _item_reader(layout))
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


def load_lamp(data_dir: str | Path, layout: LampLayout, *, include_history_samples: bool = True,
              on_error: str = "stop") -> Benchmark:
    """Load the LaMP time-based files of ``data_dir`` as a :class:`Benchmark`."""
    data_dir = Path(data_dir)
    log = ErrorLog(on_error, data_dir)
    seen: set[str] = set()
    train = _read_split(data_dir, "train", layout, log, seen)
    test = _read_split(data_dir, "dev", layout, log, seen)
    log.check()
    train, test = assemble(train, test, include_history_samples=include_history_samples,
                           instruction=layout.instruction)
    return Benchmark(train=train, test=test, errors=log.errors)
