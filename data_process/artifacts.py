"""Artifact I/O and run bookkeeping shared by every stage.

* JSONL is appended and flushed one record at a time, so a killed stage leaves every
  finished record on disk; the reader reports a malformed line with file and line
  number and tolerates (with a warning) only a torn *final* line.
* JSON files are written atomically (temp file + ``os.replace``).
* ``manifest.json`` is written last; its presence means the stage finished, and a
  finished stage is skipped unless ``--overwrite``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "rank-bm25",
                    "rouge-score", "nltk", "safetensors", "peft")


def _parse_lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """Yield (line number, text, is_last) for the non-empty lines of ``path``."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # A file written record by record ends with "\n"; text after the last newline is a
    # line whose write was cut off.
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    for j, (number, line) in enumerate(numbered):
        yield number, line, j == len(numbered) - 1


def read_jsonl(path: str | Path, *, tolerate_torn_tail: bool = True) -> list[dict[str, Any]]:
    """Read a JSONL file of objects.

    A line that is not valid JSON raises ``ValueError`` naming the file and line, except
    the final line, which a crash may have torn: it is dropped with a warning.
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
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
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
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class Stage:
    """Bookkeeping of one stage run in ``out_dir``.

    ``done`` is True when a manifest exists and ``overwrite`` is off: the caller skips
    the stage.  With ``overwrite`` the old outputs are removed first.  Otherwise the
    stage (re)starts and resumes from whatever its JSONL files already hold.
    """

    def __init__(self, name: str, out_dir: str | Path, config: Any, *, overwrite: bool = False):
        self.name = name
        self.out_dir = Path(out_dir)
        self.config = config
        self.manifest_path = self.out_dir / MANIFEST
        if overwrite and self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.done = self.manifest_path.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.started = dt.datetime.now(dt.timezone.utc)
        if self.done:
            log.info("[%s] %s exists: stage already finished (pass --overwrite to redo it)",
                     name, self.manifest_path)

    def finish(self, *, inputs: Iterable[str | Path], outputs: Iterable[str | Path],
               model: str | None = None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
        """Write ``manifest.json`` (last, atomically) and return it."""
        config = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else self.config
        finished = dt.datetime.now(dt.timezone.utc)
        manifest = {
            "stage": self.name,
            "config": config,
            "inputs": [{"path": str(p), "sha256": sha256_file(p)} for p in inputs],
            "outputs": [{"path": str(p), "sha256": sha256_file(p)} for p in outputs],
            "model": model,
            "seed": seed,
            "packages": package_versions(),
            "git": git_hash(),
            "started": self.started.isoformat(),
            "finished": finished.isoformat(),
            "seconds": round((finished - self.started).total_seconds(), 3),
            **extra,
        }
        write_json(self.manifest_path, manifest)
        return manifest
