"""Artifact I/O and run bookkeeping shared by every stage.

* JSONL is appended and flushed one record at a time, so a killed stage leaves every
  finished record on disk; the reader reports a malformed line with file and line
  number and tolerates (with a warning) only a torn *final* line.
* JSON files are written atomically (temp file + ``os.replace``).
* ``manifest.json`` is written last; its presence means the stage finished.
* A stage's **fingerprint** is everything that determines its outputs: the settings
  (config fields minus the ones a config lists in ``NOT_IN_FINGERPRINT``), the sha256 of
  each input file and the model's identity.  It is written to ``fingerprint.json`` when
  the stage starts and into the manifest.  Same fingerprint: a finished stage is skipped,
  a partial one resumes.  Different settings: the stage refuses, naming the fields.
  Changed inputs (here or further upstream): the stage is stale and refuses to reuse or
  extend its outputs.  ``--overwrite`` (or another run directory / tag) starts afresh.
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
FINGERPRINT = "fingerprint.json"
TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "rank-bm25",
                    "rouge-score", "nltk", "safetensors", "peft")


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


_MODEL_IDS: dict[str, dict[str, str]] = {}


def model_identity(model_dir: str | Path) -> dict[str, str]:
    """Name and hash of a local model: its config, weights index and safetensors headers.

    The headers (tensor names, dtypes, shapes, offsets) and file sizes identify the
    weights without reading gigabytes; a model that is not a local directory is
    identified by its name only.
    """
    key = str(model_dir)
    if key not in _MODEL_IDS:
        path = Path(model_dir)
        digest = hashlib.sha256()
        files = sorted(path.glob("config.json")) + sorted(path.glob("*.index.json")) + sorted(path.glob("*.safetensors"))
        for f in files:
            digest.update(f.name.encode())
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    head = fh.read(8)
                    digest.update(head + fh.read(int.from_bytes(head, "little")) if len(head) == 8 else head)
                digest.update(str(f.stat().st_size).encode())
            else:
                digest.update(f.read_bytes())
        _MODEL_IDS[key] = {"name": path.name, "sha256": digest.hexdigest() if files else ""}
    return _MODEL_IDS[key]


def fingerprint_settings(config: Any) -> dict[str, Any]:
    """The config fields that determine a stage's outputs (JSON-normalized)."""
    if dataclasses.is_dataclass(config):
        skip = getattr(config, "NOT_IN_FINGERPRINT", frozenset())
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    return json.loads(json.dumps(config, default=str, sort_keys=True))


def fingerprint(config: Any, inputs: Iterable[str | Path] = (), model: str | Path | None = None) -> dict[str, Any]:
    """What determines a stage's outputs: settings, input file hashes, model identity."""
    hashes = {}
    for p in inputs:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: input file does not exist (run the stage that writes it first)")
        hashes[str(p)] = sha256_file(p)
    return {"settings": fingerprint_settings(config), "inputs": hashes,
            "model": model_identity(model) if model else None}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'field (old -> new)' for every setting or model that differs between two fingerprints."""
    a, b = old.get("settings", {}), new.get("settings", {})
    changes = [f"{k} ({_short(a.get(k))} -> {_short(b.get(k))})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if (old.get("model") or {}).get("sha256") != (new.get("model") or {}).get("sha256"):
        changes.append(f"model ({(old.get('model') or {}).get('name')} -> {(new.get('model') or {}).get('name')})")
    return changes


def changed_inputs(recorded: dict[str, str], _seen: set[str] | None = None) -> list[str]:
    """Input files whose content differs from ``recorded`` (path -> sha256), here or upstream.

    An input that is unchanged is followed to the manifest of the stage that wrote it:
    if *that* stage's inputs changed since it ran, this stage is stale too (e.g. new pairs
    make the vectors, and so the generations, stale before 04 is rerun).
    """
    seen = set() if _seen is None else _seen
    changed = []
    for path, digest in recorded.items():
        if path in seen:
            continue
        seen.add(path)
        if not Path(path).is_file() or sha256_file(path) != digest:
            changed.append(path)
            continue
        upstream = Path(path).parent / MANIFEST
        if upstream.is_file() and str(upstream) not in seen:
            seen.add(str(upstream))
            prior = read_json(upstream).get("fingerprint") or {}
            changed += [f"{p} (upstream of {path})" for p in changed_inputs(prior.get("inputs", {}), seen)]
    return changed


class Stage:
    """Bookkeeping of one stage run in ``out_dir``, guarded by its fingerprint.

    ``done`` is True when the stage finished with the same fingerprint: the caller skips
    it.  A partial run with the same fingerprint resumes (the caller appends to its
    JSONL).  Different settings or model, or inputs changed since it ran (stale), raise
    ``ValueError`` naming them -- unless ``redo_changed`` (cheap, derived stages such as
    scoring), which starts afresh.

    Creating a Stage only checks; nothing touches the disk until :meth:`start`, which the
    caller runs once its inputs, model and settings are validated, right before its first
    write -- so a stage that fails on input leaves no folder behind.  A redo (``overwrite``,
    or ``redo_changed``) of an existing ``out_dir`` is built aside in ``<out_dir>.new``
    and swapped in by :meth:`finish`: until then the previous outputs stay as they were,
    whatever happens to the new run (a killed redo, run again the same way, resumes there).
    """

    def __init__(self, name: str, out_dir: str | Path, config: Any, *, overwrite: bool = False,
                 inputs: Iterable[str | Path] = (), model: str | Path | None = None,
                 settings: dict[str, Any] | None = None, redo_changed: bool = False):
        self.name = name
        self.final_dir = Path(out_dir)
        self.out_dir = self.final_dir  # where the outputs are written: the work folder of a redo
        self.config = config
        self.manifest_path = self.final_dir / MANIFEST
        self.fingerprint = fingerprint(config if settings is None else settings, inputs, model)
        self.redo = overwrite and self.final_dir.exists()
        problem = "" if self.redo else self._mismatch()
        if problem and redo_changed:
            log.info("[%s] %s: %s; redoing it", name, self.final_dir, problem)
            self.redo = True
        elif problem:
            raise ValueError(f"[{name}] {self.final_dir} {problem}. Pass --overwrite to redo it, "
                             "or choose another --tag / --run-dir; results of different settings are never mixed")
        self.done = not self.redo and self.manifest_path.exists()
        self.started: dt.datetime | None = None
        if self.done:
            log.info("[%s] %s: stage already finished with the same settings and inputs, skipped (pass --overwrite to redo it)",
                     name, self.final_dir)

    def start(self) -> Path:
        """Create the output folder (a redo's work folder) and its fingerprint; return the folder.

        Call it after everything that can fail on the user's input, right before the first
        output is written.
        """
        if self.started is None:
            if self.redo:
                self.out_dir = self.final_dir.with_name(self.final_dir.name + ".new")
                prior = self.out_dir / FINGERPRINT
                if self.out_dir.exists() and not (prior.is_file() and _same(read_json(prior), self.fingerprint)):
                    shutil.rmtree(self.out_dir)  # an earlier redo with other settings or inputs
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / FINGERPRINT, self.fingerprint)
            self.started = dt.datetime.now(dt.timezone.utc)
        return self.out_dir

    def _swap(self) -> None:
        """Put a finished redo in place of the previous outputs (removed last)."""
        old = self.final_dir.with_name(self.final_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if self.final_dir.exists():
            os.replace(self.final_dir, old)
        os.replace(self.out_dir, self.final_dir)
        shutil.rmtree(old, ignore_errors=True)
        self.out_dir = self.final_dir

    def _mismatch(self) -> str:
        """Why the outputs in ``out_dir`` cannot be reused or extended ('' when they can)."""
        if self.manifest_path.exists():
            prior, what = read_json(self.manifest_path).get("fingerprint"), "finished run"
            if prior is None:
                log.warning("[%s] %s was written before fingerprints existed: reused as it is", self.name,
                            self.manifest_path)
                return ""
        elif (self.out_dir / FINGERPRINT).exists():
            prior, what = read_json(self.out_dir / FINGERPRINT), "partial run"
        else:
            return ""
        changes = setting_changes(prior, self.fingerprint)
        if changes:
            return f"holds a {what} with other settings: {', '.join(changes)}"
        stale = changed_inputs(prior.get("inputs", {}))
        if stale or set(prior.get("inputs", {})) != set(self.fingerprint["inputs"]):
            listed = stale or sorted(set(prior.get("inputs", {})) ^ set(self.fingerprint["inputs"]))
            return f"is stale: its inputs changed since it ran: {', '.join(listed)}"
        return ""

    def finish(self, *, inputs: Iterable[str | Path], outputs: Iterable[str | Path],
               model: str | None = None, seed: int | None = None, **extra: Any) -> dict[str, Any]:
        """Write ``manifest.json`` (last, atomically), swap a redo into place; return the manifest.

        ``outputs`` are paths in :attr:`out_dir`; the manifest names where they end up.
        """
        self.start()
        config = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else self.config
        finished = dt.datetime.now(dt.timezone.utc)
        manifest = {
            "stage": self.name,
            "config": config,
            "inputs": [{"path": str(p), "sha256": sha256_file(p)} for p in inputs],
            "outputs": [{"path": str(self._final(p)), "sha256": sha256_file(p)} for p in outputs],
            "model": model,
            "seed": seed,
            "fingerprint": self.fingerprint,
            "packages": package_versions(),
            "git": git_hash(),
            "started": self.started.isoformat(),
            "finished": finished.isoformat(),
            "seconds": round((finished - self.started).total_seconds(), 3),
            **extra,
        }
        write_json(self.out_dir / MANIFEST, manifest)
        if self.out_dir != self.final_dir:
            self._swap()
        return manifest

    def _final(self, path: str | Path) -> Path:
        """Where an output written in :attr:`out_dir` lives once the stage finished."""
        path = Path(path)
        return self.final_dir / path.relative_to(self.out_dir) if path.is_relative_to(self.out_dir) else path


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
