"""PersonalWAB's files as samples, the loader behind :mod:`tasks.pwab` (the task itself).

Raw files (one directory): ``user_instructions.json`` (``{train: [...], test: [...]}`` of
``{user_id, task, type, timestamp, target: {product_info, review}}``),
``user_history_part_*.json`` (``{user_id: [{product_info, review, split}]}``),
``all_products_part_*.json`` (``{asin: product_info}``, read by :mod:`eval.pwab_env`) and
``user_profiles.json`` (``{user_id: {user_profile: {Gender, Age, ...}}}``, optional: read and
checked when present; ``user_profiles=True`` attaches each user's profile to their samples
as ``user_profile`` and the prompt then shows it -- off by default, as in the benchmark's
function-calling setting, where the agent knows the user only from their history).

A sample's ``input`` is the user's instruction, its ``output`` the *gold call*, a JSON
string ``{"name": ..., "arguments": {...}}``: the right function with

* search -- ``{"query": <target product title>}``.  The benchmark holds no gold query, so
  the title stands in for an oracle query (BM25 over the catalogue ranks it first);
* recommend -- ``{"product_sequence": <the user's last 30 asins before the task>}`` from
  the history in the target's ``main_category`` (PersonalWAB's own recommender input;
  ``recommend_history="all"``: every category; a user without history in the category
  falls back to every category);
* review -- ``{"review": <the user's real review text>}``.

History of a task = the user's behaviours whose review timestamp is strictly before the
task's, in time order, never including the target of any test task (test gold).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_process.artifact_io import read_json
from data_process.config import choose
from data_process.records import Benchmark, ErrorLog, check_not_empty
from data_process.schema import make_sample
from data_process.timeline import sort_by_time
from eval.pwab_env import numbered_parts, product_text
from eval.pwab_tools import MAX_SEQUENCE, TYPES, ToolCall, format_tool_call


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _check_behaviour(b: Any, where: str, *, need_review: bool = True) -> str | None:
    """Problem with one ``{product_info, review}`` record, or None when it is fine."""
    if not isinstance(b, dict):
        return f"{where}: expected an object, got {type(b).__name__}"
    info = b.get("product_info")
    if not isinstance(info, dict):
        return f"{where}: field 'product_info' missing or not an object"
    if not isinstance(info.get("parent_asin"), str) or not info["parent_asin"]:
        return f"{where}: field 'product_info.parent_asin' missing or not a string"
    if not isinstance(info.get("title"), str):
        return f"{where}: field 'product_info.title' missing or not a string"
    review = b.get("review")
    if not need_review and review is None:
        return None
    if not isinstance(review, dict):
        return f"{where}: field 'review' missing or not an object"
    if not isinstance(review.get("text"), str):
        return f"{where}: field 'review.text' missing or not a string"
    if _num(review.get("timestamp")) is None:
        return f"{where}: field 'review.timestamp' missing or not a number"
    return None


def history_item(b: dict[str, Any]) -> dict[str, Any]:
    """One behaviour as a schema history item (id = asin@timestamp: a user may rebuy)."""
    info, review = b["product_info"], b["review"]
    ts = int(review["timestamp"])
    return {"id": f"{info['parent_asin']}@{ts}", "input": product_text(info), "output": review["text"],
            "asin": info["parent_asin"], "title": info["title"],
            "category": info.get("main_category") or "", "rating": _num(review.get("rating")),
            "timestamp": ts}


def _load_histories(data_dir: Path, errors: ErrorLog) -> tuple[dict[str, list[dict]], dict[str, dict], int]:
    """Each user's history items in time order, the raw behaviour of every item id, and how
    many users' behaviours were not in time order in the files."""
    parts = numbered_parts(data_dir, "user_history")
    if not parts:
        raise FileNotFoundError(f"{data_dir}: no user_history_part_*.json files")
    histories: dict[str, list[dict[str, Any]]] = {}
    raw_items: dict[str, dict[str, Any]] = {}
    for path in parts:
        raw = read_json(path)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected an object {{user_id: [behaviours]}}")
        for uid, behaviours in raw.items():
            if not isinstance(behaviours, list):
                errors.report(f"{path}: user {uid!r}: expected a list of behaviours")
                continue
            for j, b in enumerate(behaviours):
                problem = _check_behaviour(b, f"{path}: user {uid!r} behaviour {j}")
                if problem:
                    errors.report(problem)
                    continue
                item = history_item(b)
                histories.setdefault(str(uid), []).append(item)
                raw_items[f"{uid}/{item['id']}"] = b
    unsorted = 0
    for uid, items in histories.items():
        histories[uid], moved = sort_by_time(items)  # stable: file order breaks ties
        unsorted += moved
    return histories, raw_items, unsorted


def _target_id(t: dict[str, Any]) -> str | None:
    review = t["target"].get("review")
    if not isinstance(review, dict) or _num(review.get("timestamp")) is None:
        return None
    return f"{t['target']['product_info']['parent_asin']}@{int(review['timestamp'])}"


def user_sequences(data_dir: str | Path, on_error: str = "stop") -> dict[str, list[str]]:
    """Each user's purchased asins in time order (what SASRec trains on)."""
    errors = ErrorLog(on_error, data_dir)
    histories, _, _ = _load_histories(Path(data_dir), errors)
    errors.check()
    return {uid: [h["asin"] for h in items] for uid, items in histories.items()}


def _check_task(t: Any, where: str) -> str | None:
    if not isinstance(t, dict):
        return f"{where}: expected an object, got {type(t).__name__}"
    for key in ("user_id", "task"):
        if not isinstance(t.get(key), str) or not t[key].strip():
            return f"{where}: field {key!r} missing or not a non-empty string"
    if t.get("type") not in TYPES:
        return f"{where}: field 'type' must be one of {sorted(TYPES)}, got {t.get('type')!r}"
    if _num(t.get("timestamp")) is None:
        return f"{where}: field 'timestamp' missing or not a number"
    return _check_behaviour(t.get("target"), f"{where}: target", need_review=t["type"] != "review")


RECOMMEND_HISTORY = ("category", "all")


def gold_call(kind: str, target: dict[str, Any], history: list[dict[str, Any]],
              recommend_history: str = "category") -> str:
    """The gold JSON call of a task (see the module docstring for what gold means)."""
    if kind == "search":
        args: dict[str, Any] = {"query": target["product_info"]["title"]}
    elif kind == "recommend":
        category = target["product_info"].get("main_category") or ""
        same = [h for h in history if h["category"] == category] if recommend_history == "category" else []
        args = {"product_sequence": [h["asin"] for h in same or history][-MAX_SEQUENCE:]}
    else:
        args = {"review": target["review"]["text"]}
    return format_tool_call(ToolCall(TYPES[kind], args))


def _load_profiles(data_dir: Path) -> dict[str, dict[str, Any]]:
    """``user_profiles.json`` as {user_id: profile fields}; {} when the file is absent."""
    path = data_dir / "user_profiles.json"
    if not path.exists():
        return {}
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object {{user_id: {{user_profile: {{...}}}}}}")
    profiles = {}
    for uid, entry in raw.items():
        profile = entry.get("user_profile", entry) if isinstance(entry, dict) else None
        if not isinstance(profile, dict):
            raise ValueError(f"{path}: user {uid!r}: field 'user_profile' missing or not an object")
        profiles[str(uid)] = profile
    return profiles


def _valid_tasks(path: Path, raw: dict[str, list], histories: dict[str, list[dict]],
                 errors: ErrorLog) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The well-formed tasks of each split as ``(sample id, task)``, every other one reported."""
    tasks: dict[str, list[tuple[str, dict[str, Any]]]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for i, t in enumerate(raw[split]):
            where = f"{path}: {split}[{i}]"
            problem = _check_task(t, where)
            if problem is None and t["user_id"] not in histories:
                problem = f"{where}: user {t['user_id']!r} has no behaviours in user_history_part_*.json"
            if problem:
                errors.report(problem)
                continue
            tasks[split].append((f"{split}-{i}", t))
    return tasks


def load_pwab(data_dir: str | Path, *, include_history_samples: bool = False, on_error: str = "stop",
              recommend_history: str | None = "category", user_profiles: bool | None = False) -> Benchmark:
    """Load PersonalWAB into train/test samples (see the module docstring).

    ``include_history_samples`` also turns each of a user's behaviours that is no task
    target into a training *review* sample (the behaviour's real review is the gold).
    """
    data_dir = Path(data_dir)
    recommend_history = choose("recommend history", recommend_history or "category",
                               {k: k for k in RECOMMEND_HISTORY})
    path = data_dir / "user_instructions.json"
    errors = ErrorLog(on_error, data_dir)
    profiles = _load_profiles(data_dir)
    if user_profiles and not profiles:
        raise FileNotFoundError(f"{data_dir / 'user_profiles.json'}: no such file (needed by --user-profiles true)")
    raw = read_json(path)
    if not isinstance(raw, dict) or not all(isinstance(raw.get(s), list) for s in ("train", "test")):
        raise ValueError(f"{path}: expected an object with lists 'train' and 'test'")
    histories, raw_items, unsorted = _load_histories(data_dir, errors)
    tasks = _valid_tasks(path, raw, histories, errors)
    errors.check()
    for split, items in tasks.items():
        check_not_empty(items, path, f"{split!r} tasks")
    test_gold = {(t["user_id"], _target_id(t)) for _, t in tasks["test"]}

    def history_before(uid: str, ts: float, own: str | None = None) -> list[dict[str, Any]]:
        return [h for h in histories[uid]
                if h["timestamp"] < ts and h["id"] != own and (uid, h["id"]) not in test_gold]

    out: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for split, items in tasks.items():
        for sid, t in items:
            history = history_before(t["user_id"], t["timestamp"], _target_id(t))
            gold = gold_call(t["type"], t["target"], history, recommend_history)
            out[split].append(make_sample(sid, t["user_id"], t["task"], gold, history, type=t["type"],
                                          timestamp=t["timestamp"], target=t["target"]))
    if include_history_samples:
        used = {(t["user_id"], _target_id(t)) for items in tasks.values() for _, t in items}
        out["train"] += _history_samples(histories, raw_items, used, history_before)
    if user_profiles:
        for s in out["train"] + out["test"]:
            s["user_profile"] = profiles.get(s["user_id"], {})
    parts = len(numbered_parts(data_dir, "user_history"))
    layout = (f"PersonalWAB files (user_instructions.json, {parts} user_history part(s), user_profiles.json "
              f"{'used' if user_profiles else 'present, not used' if profiles else 'absent'})")
    stats = {"profiles": len(histories), "unsorted_profiles": unsorted, "users_with_user_profile": len(profiles)}
    return Benchmark(out["train"], out["test"], errors.errors, layout=layout, stats=stats)


def _history_samples(histories, raw_items, used, history_before) -> list[dict[str, Any]]:
    """Review samples from behaviours that are no task's target (their real review is gold)."""
    samples = []
    for uid, items in histories.items():
        for h in items:
            if (uid, h["id"]) in used:
                continue
            b = raw_items[f"{uid}/{h['id']}"]
            target = {"product_info": b["product_info"], "review": b["review"]}
            history = history_before(uid, h["timestamp"])
            samples.append(make_sample(f"hist-{uid}-{h['id']}", uid, "Please write a review of this product for me.",
                                       gold_call("review", target, history), history, type="review",
                                       timestamp=h["timestamp"], target=target, source="history"))
    return samples
