"""Reading and writing a stage's artifact files: text, JSON and JSONL, hashes.

* JSONL is appended and flushed one record at a time (:class:`JsonlWriter`), so a killed
  stage leaves every finished record on disk; the reader reports a malformed line with
  file and line number and tolerates (with a warning) only a torn *final* line.
* JSON files are written atomically (temp file + ``os.replace``).
* A finished stage's outputs are read strictly (:func:`read_finished_jsonl`): they must
  match the sha256 its ``manifest.json`` recorded.

Fingerprints are :mod:`data_process.fingerprint`; a stage run's lifecycle (fingerprint
check, start, manifest) is :mod:`data_process.stage`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # written last by a stage: its presence means the stage finished

def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content; other bytes are an error naming the file and byte offset."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: byte {err.start} (line {line}) is not UTF-8 ({err.reason}, "
                         f"{data[err.start:err.start + 1]!r}); save the file as UTF-8") from None


def _parse_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """Yield (line number, text, is_last) for the non-empty lines of ``path``."""
    lines = read_text(path).split("\n")
    # A file written record by record ends with "\n"; text after the last newline is a
    # line whose write was cut off.
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    for j, (number, line) in enumerate(numbered):
        yield number, line, j == len(numbered) - 1


def read_jsonl(path: str | Path, *, tolerate_torn_tail: bool = True) -> list[dict[str, Any]]:
    """Read a JSONL file of objects.

    A line that is not valid JSON raises ``ValueError`` naming the file and line, except
    the final line, which a crash may have torn: it is dropped with a warning.  That
    tolerance is for a stage's own partial output; finished inputs are read with
    :func:`read_finished_jsonl`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    records: list[dict[str, Any]] = []
    for number, line, is_last in _parse_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if is_last and tolerate_torn_tail:
                log.warning("%s:%d: dropping a torn final line (%s)", path, number, err.msg)
                continue
            raise ValueError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def check_finished(path: str | Path) -> None:
    """``path``, an output of a finished stage, must be as that stage's manifest recorded it.

    A finished file is never repaired or partly read: an edit, a cut or a copy from
    another run is an error naming it (files without a manifest beside them pass).
    """
    path = Path(path)
    manifest = path.parent / MANIFEST
    if not manifest.is_file():
        return
    recorded = {Path(o.get("path", "")).name: o.get("sha256") for o in read_json(manifest).get("outputs", [])}
    if path.name in recorded and sha256_file(path) != recorded[path.name]:
        raise ValueError(f"{path}: changed since its stage finished (its sha256 differs from the one in {manifest}); "
                         "restore it, or rerun that stage with --overwrite")


def read_finished_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a finished stage's JSONL output strictly: every line must parse (a torn last
    line is an error naming file and line, not dropped) and match the stage's manifest."""
    records = read_jsonl(path, tolerate_torn_tail=False)
    check_finished(path)
    return records


class JsonlWriter:
    """Append records to a JSONL file, flushing each one.

    Opening an existing file keeps its complete records (see :attr:`existing`) and cuts
    a torn final line, so a resumed stage appends after the last finished record.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.existing: list[dict[str, Any]] = []
        if self.path.exists():
            self.existing = read_jsonl(self.path)
            self._rewrite(self.existing)
        self._file = open(self.path, "a", encoding="utf-8")

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        text = read_text(self.path)
        # Every finished record ends with "\n"; anything after the last one is torn.
        if text and not text.endswith("\n"):
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write a whole JSONL file atomically (for stages whose output is computed at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file is an error naming it."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def run_relative(path: str | Path, run_dir: str | Path) -> str:
    """``path`` relative to the run folder, as artifacts record it: identical runs give
    identical files wherever their folders live."""
    return Path(os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())).as_posix()


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
