"""A stage run's lifecycle: fingerprint check, start, resume or redo, manifest last.

``manifest.json`` is written last; its presence means the stage finished.  The stage's
fingerprint (:mod:`data_process.fingerprint`) is written to ``fingerprint.json`` when the
stage starts and into the manifest.  Same fingerprint: a finished stage is skipped, a
partial one resumes.  Different settings: the stage refuses, naming the fields.  Changed
inputs (here or further upstream): the stage is stale and refuses to reuse or extend its
outputs.  ``--overwrite`` (or another run directory / tag) starts afresh.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_process.artifact_io import MANIFEST, read_json, sha256_file, write_json
from data_process.fingerprint import (
    FINGERPRINT,
    changed_inputs,
    fingerprint,
    git_hash,
    package_versions,
    same,
    setting_changes,
)

log = logging.getLogger(__name__)


class Stage:
    """Bookkeeping of one stage run in ``out_dir``, guarded by its fingerprint.

    ``inputs`` are every file the stage reads, declared here once: they are fingerprinted
    (sha256) and listed in the manifest.  ``done`` is True when the stage finished with the
    same fingerprint: the caller skips it.  A partial run with the same fingerprint resumes (the caller appends to its
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
            log.info("[%s] %s: stage already finished with the same settings and inputs, skipped "
                     "(pass --overwrite to redo it)", name, self.final_dir)

    def start(self) -> Path:
        """Create the output folder (a redo's work folder) and its fingerprint; return the folder.

        Call it after everything that can fail on the user's input, right before the first
        output is written.
        """
        if self.started is None:
            if self.redo:
                self.out_dir = self.final_dir.with_name(self.final_dir.name + ".new")
                prior = self.out_dir / FINGERPRINT
                if self.out_dir.exists() and not (prior.is_file() and same(read_json(prior), self.fingerprint)):
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

    def finish(self, *, outputs: Iterable[str | Path], model: str | None = None, seed: int | None = None,
               **extra: Any) -> dict[str, Any]:
        """Write ``manifest.json`` (last, atomically), swap a redo into place; return the manifest.

        ``outputs`` are paths in :attr:`out_dir`; the manifest names where they end up.  Its
        inputs are the ones the stage was created with, with the hashes its fingerprint took.
        """
        self.start()
        config = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else self.config
        finished = dt.datetime.now(dt.timezone.utc)
        manifest = {
            "stage": self.name,
            "config": config,
            "inputs": [{"path": p, "sha256": digest} for p, digest in self.fingerprint["inputs"].items()],
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
