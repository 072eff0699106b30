"""Records from the file formats benchmarks ship in: JSON lists, JSONL, parquet, Arrow.

:func:`read_records` yields ``(location, raw record)`` pairs; the location names the file
and the record (``file: record 3``, ``file:4`` for a JSONL line, ``file: row 5``), so a
loader's messages can say where a bad record is.  Arrow files are the IPC *stream* files
of a ``datasets`` ``save_to_disk`` folder or cache (``data-00000-of-00001.arrow``);
Arrow IPC *file* format is read too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_process.artifact_io import read_json, read_text
from data_process.records import ErrorLog

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


def _arrow_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with pa.memory_map(str(path)) as source:
            return ipc.open_stream(source).read_all().to_pylist()
    except pa.ArrowInvalid:
        pass
    try:
        with pa.memory_map(str(path)) as source:
            return ipc.open_file(source).read_all().to_pylist()
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path}: not an Arrow stream or file ({err})") from None


def _table_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".arrow":
        return _arrow_rows(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except pa.ArrowInvalid as err:
        raise ValueError(f"{path}: not a parquet file ({err})") from None


def read_records(path: Path, log: ErrorLog) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) for a JSON (a list), JSONL, parquet or Arrow file.

    A malformed JSONL line is reported to ``log`` and skipped; a malformed JSON file or
    one that is no list raises ``ValueError`` naming the file.
    """
    if path.suffix in (".parquet", ".arrow"):
        for i, rec in enumerate(_table_rows(path)):
            yield f"{path}: row {i}", rec
    elif path.suffix == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}: record {i}", rec
    else:
        for number, line in enumerate(read_text(path).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                log.report(f"{path}:{number}: malformed JSON ({err.msg})")
