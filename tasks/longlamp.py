"""LongLaMP: personalized abstract generation (temporal setting).

Files in ``data_dir`` (:func:`find_longlamp_files` says which layout it found): a training
split ``train`` and a test split ``test`` (or, when there is none, ``dev`` / ``val``), as

* single files ``train.jsonl`` / ``.json`` (a list) / ``.parquet`` / ``.arrow``;
* Hugging Face parquet shards ``train-00000-of-00007.parquet`` (in ``data_dir``, in
  ``data_dir/data`` or in ``data_dir/train/``), as the hub's ``abstract_generation_temporal``
  is distributed;
* a ``datasets`` ``save_to_disk`` folder (``train/data-00000-of-00001.arrow`` ...) or the
  ``datasets`` cache's ``<name>-train-00000-of-00007.arrow`` files (Arrow streams).

A record is ``{name, id?, input, output, profile:[{id, title, abstract, year?}]}``.  The
user is identified by ``name`` (in LongLaMP the author; in the shared Debian data the
hashed maintainer id).  A record without ``id`` gets ``<split>-<position>``.  A profile
item's ``title`` is the history input, its ``abstract`` the history output and its
``year`` its date.  The input is ``Generate an abstract for the title "<title>" using the
following items: 1. ...``; the title alone is the retrieval query.  A history item promoted
to a training sample takes the input of a real question about the same paper when there
is one, else ``'Generate an abstract for the title "<title>".'`` (profiles carry no items).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from data_process.assemble import assemble
from data_process.record_files import SUFFIXES, read_records
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

TEST_NAMES = ("test", "dev", "val")
_PREFIX = re.compile(r"^\s*generate an abstract for the title\s*:?\s*", re.IGNORECASE)
_ITEMS = re.compile(r"\"?\s*,?\s*using the following items\s*:\s*", re.IGNORECASE)


def abstract_instruction(title: str) -> str:
    """The LongLaMP question input for a paper title (without an items clause)."""
    return f'Generate an abstract for the title "{title}".'


def split_input(text: str) -> tuple[str, str]:
    """(title, items clause) of a LongLaMP input; the clause is "" when there is none.

    ``Generate an abstract for the title "X" using the following items: 1. a 2. b`` ->
    ``("X", "1. a 2. b")``; a text that is no such input is its own title.
    """
    prefix = _PREFIX.match(text)
    if not prefix:
        return text.strip(), ""
    rest, items = text[prefix.end():].strip(), ""
    marker = _ITEMS.search(rest)
    if marker:
        rest, items = rest[:marker.start()], rest[marker.end():].strip()
    else:
        rest = rest.rstrip().removesuffix(".").rstrip()
    return rest.removeprefix('"').removesuffix('"').strip(), items


def title(text: str) -> str:
    """The title of a LongLaMP input (``Generate an abstract for the title "X" ...`` -> X)."""
    return split_input(text)[0]


def _split_files(data_dir: Path, name: str) -> tuple[str, list[Path]] | None:
    """(layout, files) of one split in ``data_dir``; None when it has none."""
    for suffix in SUFFIXES:
        if (data_dir / f"{name}{suffix}").is_file():
            return "single files", [data_dir / f"{name}{suffix}"]
    shards = sorted(p for d in (data_dir, data_dir / "data") for p in d.glob(f"{name}-*.parquet"))
    sub = data_dir / name
    if not shards and sub.is_dir():
        shards = sorted(sub.glob("*.parquet"))
    if shards:
        return "Hugging Face parquet shards", shards
    if sub.is_dir() and sorted(sub.glob("*.arrow")):
        return "datasets save_to_disk folder", sorted(sub.glob("*.arrow"))
    cached = sorted({*data_dir.glob(f"*-{name}.arrow"), *data_dir.glob(f"*-{name}-*-of-*.arrow")})
    return ("datasets cache files", cached) if cached else None


def _looked_for(name: str) -> str:
    return ", ".join([*(f"{name}{s}" for s in SUFFIXES), f"{name}-*.parquet", f"data/{name}-*.parquet",
                      f"{name}/*.parquet", f"{name}/*.arrow", f"*-{name}[-*-of-*].arrow"])


def find_longlamp_files(data_dir: Path) -> tuple[str, dict[str, tuple[str, list[Path]]]]:
    """The layout found in ``data_dir`` and the (split name, files) of ``train`` and ``test``."""
    train = _split_files(data_dir, "train")
    if train is None:
        raise FileNotFoundError(f"{data_dir}: no LongLaMP split file for the training split; "
                                f"looked for {_looked_for('train')}")
    for name in TEST_NAMES:
        test = _split_files(data_dir, name)
        if test is not None:
            break
    else:
        looked = "; ".join(_looked_for(n) for n in TEST_NAMES)
        raise FileNotFoundError(f"{data_dir}: no LongLaMP split file for the test split (test, dev or val); "
                                f"looked for {looked}")
    layouts = list(dict.fromkeys([train[0], test[0]]))
    shown = ", ".join(f"{split}: {len(files)} file(s) {files[0].relative_to(data_dir)}"
                      + (" ..." if len(files) > 1 else "") for split, (_, files) in (("train", train), (name, test)))
    return f"LongLaMP {' + '.join(layouts)} ({shown})", {"train": ("train", train[1]), "test": (name, test[1])}


def _read_item(raw: Any, where: str) -> dict:
    item_id = need_id(raw, "id", where)
    where = f"{where} (id {item_id!r})"
    item = {"id": item_id, "input": need_str(raw, "title", where), "output": need_str(raw, "abstract", where)}
    for field in ("year", "date"):  # the hub's files say year; a converted file may say date
        if date_key(raw.get(field), where, field) is not None:
            item["date"] = raw[field]
            break
    return item


def _read_split(paths: list[Path], split: str, log: ErrorLog, seen: set[tuple[str, str]],
                users: UserIds) -> list[dict]:
    samples, i = [], -1
    for path in paths:
        for where, rec in read_records(path, log):
            i += 1  # positions run on across shards, so default ids stay unique
            try:
                # Parquet and Arrow store an absent id as null.
                has_id = isinstance(rec, dict) and rec.get("id") is not None
                rid = need_id(rec, "id", where) if has_id else f"{split}-{i}"
                where = f"{where} (id {rid!r})"
                user = users.read(rec, "name", where)
                text, gold = need_str(rec, "input", where), need_str(rec, "output", where)
                history = history_items(need_list(rec, "profile", where, non_empty=True), where, _read_item)
                if (user, rid) in seen:  # several authors may share a paper's id: scoped later
                    raise BadRecord(f"{where}: duplicate record id {rid!r} for user {user!r}")
            except BadRecord as err:
                log.report(str(err))
                continue
            seen.add((user, rid))
            samples.append(make_sample(rid, user, text, gold, history, source="question"))
    return samples


class LongLamp(TextTask):
    name = "longlamp"
    summary = "LongLaMP abstract generation"
    defaults = {"include_history_samples": True, "history_k": 3, "max_new_tokens": 256, "threshold": 0.2,
                "lora_prompt": "zeroshot"}
    header = "Abstracts this author wrote for earlier papers:"

    def load(self, data_dir: Path, *, include_history_samples: bool = True, on_error: str = "stop") -> Benchmark:
        return load_longlamp(data_dir, include_history_samples=include_history_samples, on_error=on_error)

    def query(self, sample: dict[str, Any]) -> str:
        return title(sample["input"])

    def question(self, text: str) -> str:
        name, items = split_input(text)
        ask = f'Generate an abstract for the title "{name}"'
        ask += f" using the following items: {items}" if items else "."
        return ask + "\nWrite only the abstract."

    def item(self, short: str, long: str) -> str:
        return f'Abstract: "{long}" for title: "{short}"'

    def fields(self, item: dict[str, Any]) -> tuple[str, str]:
        return title(item["input"]), item["output"].strip()


TASK = LongLamp()


def load_longlamp(data_dir: str | Path, *, include_history_samples: bool = True,
                  on_error: str = "stop") -> Benchmark:
    """Load LongLaMP abstract-generation files of ``data_dir`` as a :class:`Benchmark`."""
    data_dir = Path(data_dir)
    layout, files = find_longlamp_files(data_dir)
    log = ErrorLog(on_error, data_dir)
    seen: set[tuple[str, str]] = set()
    users = UserIds()
    train = _read_split(files["train"][1], "train", log, seen, users)
    test = _read_split(files["test"][1], files["test"][0], log, seen, users)
    log.check()
    for (name, paths), samples in ((files["train"], train), (files["test"], test)):
        check_not_empty(samples, ", ".join(map(str, paths)), f"{name} records")
    train, test, stats = assemble(train, test, include_history_samples=include_history_samples,
                                  instruction=abstract_instruction, content=title)
    return Benchmark(train=train, test=test, errors=log.errors, layout=layout, stats=stats)
