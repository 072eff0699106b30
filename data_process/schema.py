"""The one normalized sample schema every benchmark loader produces.

One JSON object a line: ``id, user_id, input, output, history`` where ``history`` is a
list of ``{id, input, output}`` items in the user's time order.  PersonalWAB samples
also carry ``type``, ``timestamp`` and ``target`` (on the sample and on history items).
Stage 02 adds ``scores`` (one relevance score per history item, history re-sorted).
"""

from __future__ import annotations

import re
from typing import Any

REQUIRED = {"id": str, "user_id": str, "input": str, "output": str, "history": list}
HISTORY_REQUIRED = {"id": str, "input": str, "output": str}


def validate_sample(record: Any, where: str) -> dict[str, Any]:
    """Check one sample record; raise ``ValueError`` naming ``where``, the id and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    rid = record.get("id", "?")
    for key, kind in REQUIRED.items():
        if key not in record:
            raise ValueError(f"{where}: record {rid!r}: missing field {key!r}")
        if not isinstance(record[key], kind):
            raise ValueError(f"{where}: record {rid!r}: field {key!r} must be {kind.__name__}, "
                             f"got {type(record[key]).__name__}")
    for j, item in enumerate(record["history"]):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: record {rid!r}: history[{j}] must be an object")
        for key, kind in HISTORY_REQUIRED.items():
            if not isinstance(item.get(key), kind):
                raise ValueError(f"{where}: record {rid!r}: history[{j}] field {key!r} "
                                 f"missing or not {kind.__name__}")
    return record


def make_sample(id: str, user_id: str, input: str, output: str,
                history: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Build a sample dict in the canonical key order."""
    return {"id": str(id), "user_id": str(user_id), "input": input, "output": output,
            "history": history, **extra}


# Ids become folder and file names (a user's adapter folder, a run's tag): a plain name
# cannot climb out of its folder ("..", "/", an absolute path) or hide (a leading dot).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]*")
SAFE_NAME_RULE = "letters, digits and . _ @ + - only, not starting with '.'"


def is_safe_name(name: Any) -> bool:
    """True for a string that names one entry of a folder and nothing outside it."""
    return isinstance(name, str) and _SAFE_NAME.fullmatch(name) is not None


def checked_name(name: Any, where: str, what: str = "user_id") -> str:
    """``name`` when :func:`is_safe_name`; else ``ValueError`` naming ``where`` and ``what``."""
    if not is_safe_name(name):
        raise ValueError(f"{where}: {what} {name!r} cannot name a folder or file ({SAFE_NAME_RULE})")
    return name
