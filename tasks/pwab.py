"""PersonalWAB: personalized web agent (function calling: search, recommend, review).

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

import json
from collections import Counter
from pathlib import Path
from typing import Any

from data_process.artifact_io import read_json
from data_process.config import choose
from data_process.records import Benchmark, ErrorLog, check_not_empty
from data_process.schema import make_sample
from data_process.timeline import sort_by_time
from eval.pwab_env import default_cache_dir, numbered_parts, product_text
from eval.pwab_eval import PWAB_METRICS, evaluate_pwab
from eval.pwab_tools import MAX_SEQUENCE, TOOLS, TYPES, ToolCall, format_tool_call, parse_tool_call
from tasks.base import DEFAULT_MAX_PROMPT_TOKENS, Task, fit_text, token_counter

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


# When each tool is the right one: a small model otherwise picks by the history's look
# (a list of asins suggests the recommender) rather than by the request.
_WHEN = {"search_product_by_query": "when the user asks to find, search for or look for a product",
         "get_recommendations_by_history": "when the user asks what to buy next or for a recommendation",
         "add_product_review": "when the user asks to write or post a review"}


# The request each tool's example call answers.  Measured on seen_val of the synthetic
# benchmark (SmolLM2-135M, first function token, 40 requests): bare example calls 27/40
# right functions, no examples 20/40 (every request became a search), request -> call
# examples 30/40; a bare search example was also copied verbatim as the query.
_EXAMPLE_REQUESTS = {"search_product_by_query": "Find me a waterproof bluetooth speaker.",
                     "get_recommendations_by_history": "What should I buy next?",
                     "add_product_review": "Write my review of the desk lamp."}


def _tools_text() -> str:
    # A concrete example per tool, as a request and the call that answers it: small models
    # copy a template's "{...}" literally, and a call alone does not show which words of a
    # request become its argument.
    lines = []
    for i, (name, (desc, arg, schema, example)) in enumerate(TOOLS.items(), 1):
        when = f" Use it {_WHEN[name]}." if name in _WHEN else ""
        lines.append(f"{i}. {name}: {desc}.{when} Arguments: {json.dumps({arg: schema})}\n"
                     f'   Example: request "{_EXAMPLE_REQUESTS[name]}" -> {format_tool_call(ToolCall(name, {arg: example}))}')
    return "\n".join(lines)


def _item_line(n: int, h: dict[str, Any], review_words: int) -> str:
    words = str(h.get("output", "")).split()
    review = " ".join(words[:review_words]) + (" ..." if len(words) > review_words else "")
    rating = h.get("rating")
    rated = f" | rated {rating:g}/5" if isinstance(rating, (int, float)) else ""
    category = f" | {h['category']}" if h.get("category") else ""
    title = h.get("title") or str(h.get("input", ""))[:80]
    return f'[{n}] {h.get("asin", h.get("id", ""))} | {title}{category}{rated} | review: "{review}"'


def _render(sample: dict[str, Any], lines: list[str]) -> str:
    parts = ["You are a personalized shopping assistant. Fulfil the user's request by calling "
             "exactly one of these tools:", _tools_text(), ""]
    if lines:
        parts += ["The user's past purchases and reviews (asin | title | category | rating | review):",
                  *lines, ""]
    if sample.get("user_profile"):  # only with --user-profiles true (off by default)
        about = "; ".join(f"{k}: {v}" for k, v in sample["user_profile"].items())
        parts += [f"About the user: {about}", ""]
    parts.append(f"User request: {sample['input']}")
    target = sample.get("target") or {}
    if sample.get("type") == "review" and isinstance(target.get("product_info"), dict):
        info = target["product_info"]
        parts.append(f"Product to review: {info.get('title', '')} ({info.get('main_category') or ''})")
    parts.append("Answer with one JSON tool call only, like the examples above, with arguments for this request.")
    return "\n".join(parts)


def _fit_request(sample: dict[str, Any], tokenizer, budget: int) -> tuple[str, bool]:
    return fit_text(sample["input"], lambda text: _render({**sample, "input": text}, []), tokenizer, budget)


def build_pwab_prompt(sample: dict[str, Any], history: list[dict[str, Any]], tokenizer=None,
                      max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, review_words: int = 40) -> str:
    """Function-calling user message: the three tools, history (most relevant first), request.

    Each history item shows asin, title, category, rating and the (shortened) review.  To
    fit ``max_prompt_tokens`` (counted with ``tokenizer``, else whitespace words) the least
    relevant items are dropped first; the tools are never cut, and a request that alone
    exceeds the budget is cut from its end (:func:`tasks.base.fit_text`).
    """
    if not isinstance(sample.get("input"), str):
        raise ValueError(f"sample {sample.get('id', '?')!r}: missing field 'input'")
    count = token_counter(tokenizer)
    request, cut = _fit_request(sample, tokenizer, max_prompt_tokens)
    if cut:  # the request alone is over budget: no room for history
        return request
    lines = [_item_line(n, h, review_words) for n, h in enumerate(history, 1)]
    prompt = _render(sample, lines)
    while lines and count(prompt) > max_prompt_tokens:
        lines.pop()
        prompt = _render(sample, lines)
    return prompt


class PersonalWab(Task):
    name = "pwab"
    summary = "PersonalWAB function calling (search, recommend, review)"
    defaults = {"include_history_samples": False, "recommend_history": "category", "user_profiles": False,
                "history_k": 5, "max_new_tokens": 128, "positive_k": 5, "search_threshold": 0.65,
                "review_threshold": 0.51, "recommend_in_list": True, "constrained": True}
    metrics = tuple(PWAB_METRICS)
    selection_metric = "racc"  # the result: a wrong function scores 0, so it includes FACC
    pair_collector = "tool_calls"
    record_fields = ("type", "target", "timestamp")
    setup_stages = ("train_sasrec",)  # the recommender behind get_recommendations_by_history
    load_options = ("recommend_history", "user_profiles")
    # Small models echo the tool list instead of calling a tool; opening the assistant turn
    # with the call's first key makes every answer a call.
    response_prefix = '{"name": "'
    call_schema = {name: (arg, "string_list" if schema["type"] == "array" else "string")
                   for name, (_, arg, schema, _) in TOOLS.items()}

    def load(self, data_dir: Path, *, include_history_samples: bool = False, on_error: str = "stop",
             **options: Any) -> Benchmark:
        return load_pwab(data_dir, include_history_samples=include_history_samples, on_error=on_error, **options)

    def prompt(self, sample, history, tokenizer=None, max_prompt_tokens=DEFAULT_MAX_PROMPT_TOKENS) -> str:
        return build_pwab_prompt(sample, history, tokenizer, max_prompt_tokens)

    def input_cut(self, sample, tokenizer=None, max_prompt_tokens=DEFAULT_MAX_PROMPT_TOKENS) -> bool:
        return _fit_request(sample, tokenizer, max_prompt_tokens)[1]

    def postprocess(self, text: str) -> str:
        """The canonical JSON of the generated call, else the stripped text.

        Unparseable text is kept as it is, so that evaluation still counts its failure.
        """
        call = parse_tool_call(text, Counter())  # counted once, where it is scored
        return format_tool_call(call) if call else (text or "").strip()

    def evaluate(self, records, *, data_dir, run_dir) -> dict[str, Any]:
        # The tool environment (search index, SASRec) is shared by the run: {run_dir}/pwab_env.
        return {"n": len(records), **evaluate_pwab(records, data_dir, default_cache_dir(run_dir))}


TASK = PersonalWab()
