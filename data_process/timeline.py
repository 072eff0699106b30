"""Time order of a user's history, taken from the data's own dates.

A history item's time is its ``date`` (LaMP ``date``, a ``"YYYY-MM-DD"`` string or an
integer; LongLaMP ``year``, kept as ``date``) or its ``timestamp`` (PersonalWAB).  Dates
compare as tuples of their numbers (``"2012-04-09"`` -> ``(2012, 4, 9)``, ``2012`` ->
``(2012,)``), so strings and integers mix.

Rules, the same everywhere (loaders, the leakage rule, the ``recency`` ranker):

* a history is sorted by time, stably: items with the same date keep their list order;
* an item without a date keeps its place after the dated item before it (it counts as
  having that item's date; leading undated items count as having the first date);
* a history without any date is in list order, which then is the time order;
* "strictly earlier" compares these times: two items of the same date (or, without dates,
  the same position) are never earlier than each other.
"""

from __future__ import annotations

import re
from typing import Any

from data_process.records import BadRecord

TimeKey = tuple[float, ...]
_DATE = re.compile(r"\s*\d+(?:\s*[-/.:T ]\s*\d{1,2}){0,5}(?:\.\d+)?\s*(?:Z|[+-]\d{2}:?\d{2})?\s*")


def date_key(value: Any, where: str = "", field: str = "date") -> TimeKey | None:
    """The comparable time of a raw date value; None when there is none.

    Raises :class:`BadRecord` naming ``where`` and ``field`` for a value that is no date.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),)
    if isinstance(value, str) and _DATE.fullmatch(value):
        # Time-zone offsets are dropped: LaMP dates are days, and the order within a
        # day is unknown anyway (same-date items are never earlier than each other).
        numbers = re.findall(r"\d+", re.sub(r"(?:Z|[+-]\d{2}:?\d{2})\s*$", "", value.strip()))
        return tuple(float(n) for n in numbers[:6])
    raise BadRecord(f"{where}: field {field!r} must be a date (YYYY[-MM[-DD]] or a number), got {value!r}")


def item_time(item: dict[str, Any]) -> TimeKey | None:
    """The time of a history item (its ``date``, else its ``timestamp``), if it has one."""
    value = item.get("date", item.get("timestamp"))
    try:
        return date_key(value)
    except BadRecord:
        return None  # loaders reject bad dates; a hand-made item without one sorts by position


def time_keys(items: list[dict[str, Any]]) -> list[TimeKey]:
    """One comparable time per item (see the module rules); positions when nothing is dated."""
    times = [item_time(item) for item in items]
    dated = [t for t in times if t is not None]
    if not dated:
        return [(float(i),) for i in range(len(items))]
    keys, last = [], dated[0]
    for t in times:
        last = t if t is not None else last
        keys.append(last)
    return keys


def sort_by_time(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """``items`` in time order (stable), and whether that changed their order."""
    keys = time_keys(items)
    order = sorted(range(len(items)), key=lambda i: keys[i])
    return [items[i] for i in order], order != list(range(len(items)))


def earlier_than(items: list[dict[str, Any]], keys: list[TimeKey], j: int) -> list[dict[str, Any]]:
    """The items strictly earlier than ``items[j]`` (``keys`` from :func:`time_keys`)."""
    return [item for item, key in zip(items, keys, strict=True) if key < keys[j]]
