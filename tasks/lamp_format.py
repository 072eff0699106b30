"""The LaMP tasks' shared shape (LaMP-4 headlines, LaMP-5 titles): file layout and prompt.

Files: ``train_questions.json`` and ``dev_questions.json`` (lists of
``{id, input, user_id, profile:[{id, <input field>, <output field>, date?}]}``) and
``train_outputs.json`` and ``dev_outputs.json`` (``{task, golds:[{id, output}]}``), either
flat in ``data_dir`` or in the layout LaMP is distributed in: ``train/train_*.json`` and
``dev/dev_*.json`` (``valid/`` and ``valid_*.json`` are accepted for the dev split).  Train
questions become training samples, dev questions test samples.  A profile item's input
field (LaMP-4 ``text``, LaMP-5 ``abstract``) is the history input, its output field
(``title``) the history output and its ``date`` (``"YYYY-MM-DD"`` or an integer) its time;
a history item promoted to a training sample is posed with the task's instruction.

Only the time-based split carries ``user_id`` (the user-based split holds different users
in train and dev, which Fints cannot use); files without it are rejected with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from data_process.artifact_io import read_json
from data_process.assemble import assemble
from data_process.records import (
    BadRecord,
    Benchmark,
    ErrorLog,
    UserIds,
    check_not_empty,
    history_items,
    need_id,
    need_list,
    need_str,
)
from data_process.schema import make_sample
from data_process.timeline import date_key
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
    content: Callable[[str], str]      # question input -> the history input it is about


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
        self.layout = LampLayout(self.input_field, self.output_field, lambda text: self.instruction + text,
                                 self.text)

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
        if date_key(raw.get("date"), where) is not None:
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


def _read_split(q_path: Path, o_path: Path, layout: LampLayout, log: ErrorLog, seen_ids: set[str],
                users: UserIds) -> list[dict]:
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
            user = users.read(q, "user_id", where)
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


SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "valid")}


def _split_files(data_dir: Path, split: str) -> tuple[Path, Path] | None:
    """The questions and outputs file of a split, flat or in its subfolder; None if neither."""
    for name in SPLIT_NAMES[split]:
        for folder in (data_dir, data_dir / name):
            q_path, o_path = folder / f"{name}_questions.json", folder / f"{name}_outputs.json"
            if q_path.exists() or o_path.exists():
                return q_path, o_path
    return None


def find_lamp_files(data_dir: Path) -> tuple[str, dict[str, tuple[Path, Path]]]:
    """The layout found in ``data_dir`` and each split's (questions, outputs) files.

    A split found only in part names its missing file; no split found at all lists
    every name that was looked for.
    """
    found = {split: _split_files(data_dir, split) for split in SPLIT_NAMES}
    if not any(found.values()):
        tried = [f"{sub}{name}_{kind}.json" for split, names in SPLIT_NAMES.items() for name in names
                 for sub in ("", f"{name}/") for kind in ("questions", "outputs")]
        raise FileNotFoundError(f"{data_dir}: no LaMP files; looked for {', '.join(tried)}")
    files = {}
    for split, paths in found.items():
        if paths is None:
            paths = (data_dir / f"{split}_questions.json", data_dir / f"{split}_outputs.json")
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such file (the LaMP {split} split needs it)")
        files[split] = paths
    folders = list(dict.fromkeys(str(q.parent.relative_to(data_dir)) for q, _ in files.values()))
    layout = "LaMP flat files" if folders == ["."] else "LaMP split folders " + " + ".join(f + "/" for f in folders)
    return f"{layout} ({', '.join(str(p.relative_to(data_dir)) for q, o in files.values() for p in (q, o))})", files


def load_lamp(data_dir: str | Path, layout: LampLayout, *, include_history_samples: bool = True,
              on_error: str = "stop") -> Benchmark:
    """Load the LaMP time-based files of ``data_dir`` as a :class:`Benchmark`."""
    data_dir = Path(data_dir)
    found, files = find_lamp_files(data_dir)
    log = ErrorLog(on_error, data_dir)
    seen: set[str] = set()
    users = UserIds()
    train = _read_split(*files["train"], layout, log, seen, users)
    test = _read_split(*files["dev"], layout, log, seen, users)
    log.check()
    for split, samples in (("train", train), ("dev", test)):
        check_not_empty(samples, files[split][0], f"{split} questions")
    train, test, stats = assemble(train, test, include_history_samples=include_history_samples,
                                  instruction=layout.instruction, content=layout.content)
    return Benchmark(train=train, test=test, errors=log.errors, layout=found, stats=stats)
