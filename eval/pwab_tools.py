"""PersonalWAB's tool set: the three functions, their argument schemas, and calls.

Every side of the PersonalWAB pipeline -- gold calls, pair texts, generated calls, the
environment that runs them -- uses :class:`ToolCall` and its one canonical JSON text
(:func:`format_tool_call`); :func:`parse_tool_call` reads a call out of generated text.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from data_process.text import json_objects

TYPES = {"search": "search_product_by_query", "recommend": "get_recommendations_by_history",
         "review": "add_product_review"}
MAX_SEQUENCE = 30  # longest product_sequence the recommender reads

# name -> (description, argument name, JSON schema of that argument, example value)
TOOLS: dict[str, tuple[str, str, dict[str, Any], Any]] = {
    "search_product_by_query": (
        "search the product catalogue with a text query; returns the top 10 products",
        "query", {"type": "string"}, "waterproof bluetooth speaker"),
    "get_recommendations_by_history": (
        "recommend products that follow a sequence of product asins the user bought "
        f"(time order, most recent last, at most {MAX_SEQUENCE})",
        "product_sequence", {"type": "array", "items": {"type": "string"}}, ["B0EXAMPLE1", "B0EXAMPLE2"]),
    "add_product_review": (
        "post the user's review of the product they bought", "review", {"type": "string"},
        "Sturdy and easy to use. Worth the price."),
}


@dataclass
class ToolCall:
    """One parsed tool call."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


def _as_call(obj: dict[str, Any]) -> tuple[ToolCall | None, str]:
    if isinstance(obj.get("tool_call"), dict):  # {"tool_call": {...}} wrapper of some prompts
        obj = obj["tool_call"]
    name, args = obj.get("name"), obj.get("arguments", obj.get("parameters"))
    if not isinstance(name, str):
        return None, "missing_name"
    if name not in TOOLS:
        return None, "unknown_tool"
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None, "bad_arguments"
    if not isinstance(args, dict):
        return None, "bad_arguments"
    arg = TOOLS[name][1]
    if arg not in args:
        return None, "missing_argument"
    value = args[arg]
    ok = isinstance(value, str) if arg != "product_sequence" else \
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        return None, "wrong_argument_type"
    return ToolCall(name, {arg: value}), ""


def parse_tool_call(text: str, failures: Counter | None = None) -> ToolCall | None:
    """Parse a generated tool call (bare or fenced JSON, optional ``tool_call`` wrapper).

    Returns None on failure and counts the reason (``no_json``, ``missing_name``,
    ``unknown_tool``, ``bad_arguments``, ``missing_argument``, ``wrong_argument_type``)
    in ``failures``.  Never raises.
    """
    reason = "no_json"
    for obj, _ in json_objects(text if isinstance(text, str) else ""):
        call, why = _as_call(obj)
        if call is not None:
            return call
        if reason == "no_json":
            reason = why  # the first object's problem is the most telling one
    if failures is not None:
        failures[reason] += 1
    return None


def format_tool_call(call: ToolCall) -> str:
    """Canonical JSON text of a call, the one shape of every gold, chosen and rejected text."""
    return json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
