"""Fingerprints: what determines a stage's outputs, and what changed since it ran.

A stage's **fingerprint** is its settings (config fields minus the ones a config lists in
``NOT_IN_FINGERPRINT``), the sha256 of each input file and the model's identity.  Two
fingerprints differ in settings or model (:func:`setting_changes`: the stage refuses,
naming the fields) or in inputs (:func:`changed_inputs`: here or further upstream, the
stage is stale).  :mod:`data_process.stage` applies them to a stage run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from data_process.artifact_io import MANIFEST, read_json, sha256_file

FINGERPRINT = "fingerprint.json"  # a started stage's fingerprint (its manifest holds it once finished)
TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "rank-bm25",
                    "rouge-score", "nltk", "safetensors", "peft")


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
        files = (sorted(path.glob("config.json")) + sorted(path.glob("*.index.json"))
                 + sorted(path.glob("*.safetensors")))
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
        # A config whose output-neutral fields depend on its other settings says so in a method.
        skip = config.not_in_fingerprint() if hasattr(config, "not_in_fingerprint") else \
            getattr(config, "NOT_IN_FINGERPRINT", frozenset())
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
    changes = [f"{k} ({_short(a.get(k))} -> {_short(b.get(k))})"
               for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
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


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two fingerprints are equal (as JSON)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
