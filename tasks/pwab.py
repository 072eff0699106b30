"""PersonalWAB: personalized web agent (function calling: search, recommend, review).

The task: the function-calling prompt (the three tools with an example call each, the
user's history, the request), post-processing of a generated call, and the evaluator.
Loading the benchmark's files into samples, with their gold calls, is
:mod:`tasks.pwab_data`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from data_process.config import choose
from data_process.records import Benchmark
from eval.pwab_env import default_cache_dir
from eval.pwab_eval import PWAB_METRICS, evaluate_pwab
from eval.pwab_tools import TOOLS, ToolCall, format_tool_call, parse_tool_call
from tasks.base import DEFAULT_MAX_PROMPT_TOKENS, Task, fit_text, token_counter
from tasks.pwab_data import load_pwab

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
        call = format_tool_call(ToolCall(name, {arg: example}))
        lines.append(f"{i}. {name}: {desc}.{when} Arguments: {json.dumps({arg: schema})}\n"
                     f'   Example: request "{_EXAMPLE_REQUESTS[name]}" -> {call}')
    return "\n".join(lines)


# How a history line is laid out (``--history-line``).  The recommender's argument is a
# list of asins, so a line keeps its item's asin; title_first puts it last, because a
# small model copies a line's leading identifier into a search query.
HISTORY_LINES = ("title_first", "asin_first")
_HEADERS = {"title_first": "title | category | rating | review (item asin)",
            "asin_first": "asin | title | category | rating | review"}


def _item_line(n: int, h: dict[str, Any], review_words: int, layout: str = "title_first") -> str:
    words = str(h.get("output", "")).split()
    review = " ".join(words[:review_words]) + (" ..." if len(words) > review_words else "")
    rating = h.get("rating")
    rated = f" | rated {rating:g}/5" if isinstance(rating, (int, float)) else ""
    category = f" | {h['category']}" if h.get("category") else ""
    title = h.get("title") or str(h.get("input", ""))[:80]
    asin = h.get("asin", h.get("id", ""))
    if layout == "asin_first":
        return f'[{n}] {asin} | {title}{category}{rated} | review: "{review}"'
    return f'[{n}] {title}{category}{rated} | review: "{review}" (item {asin})'


def _render(sample: dict[str, Any], lines: list[str], layout: str = "title_first") -> str:
    parts = ["You are a personalized shopping assistant. Fulfil the user's request by calling "
             "exactly one of these tools:", _tools_text(), ""]
    if lines:
        parts += [f"The user's past purchases and reviews ({_HEADERS[layout]}):", *lines, ""]
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
                      max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, review_words: int = 40,
                      history_line: str = "title_first") -> str:
    """Function-calling user message: the three tools, history (most relevant first), request.

    Each history item shows title, category, rating, the (shortened) review and the item's
    asin (``history_line``: title_first, the asin last; asin_first, the asin leading).  To
    fit ``max_prompt_tokens`` (counted with ``tokenizer``, else whitespace words) the least
    relevant items are dropped first; the tools are never cut, and a request that alone
    exceeds the budget is cut from its end (:func:`tasks.base.fit_text`).
    """
    if not isinstance(sample.get("input"), str):
        raise ValueError(f"sample {sample.get('id', '?')!r}: missing field 'input'")
    choose("history line", history_line, dict.fromkeys(HISTORY_LINES))
    count = token_counter(tokenizer)
    request, cut = _fit_request(sample, tokenizer, max_prompt_tokens)
    if cut:  # the request alone is over budget: no room for history
        return request
    lines = [_item_line(n, h, review_words, history_line) for n, h in enumerate(history, 1)]
    prompt = _render(sample, lines, history_line)
    while lines and count(prompt) > max_prompt_tokens:
        lines.pop()
        prompt = _render(sample, lines, history_line)
    return prompt


class PersonalWab(Task):
    name = "pwab"
    summary = "PersonalWAB function calling (search, recommend, review)"
    defaults = {"include_history_samples": False, "recommend_history": "category", "user_profiles": False,
                "history_k": 5, "max_new_tokens": 128, "positive_k": 5, "search_threshold": 0.65,
                "review_threshold": 0.51, "recommend_in_list": False, "positive_tries": 1,
                "positive_temperature": 0.8, "history_line": "title_first", "constrained": True,
                "lora_prompt": "rag"}
    metrics = tuple(PWAB_METRICS)
    selection_metric = "racc"  # the result: a wrong function scores 0, so it includes FACC
    pair_collector = "tool_calls"
    record_fields = ("type", "target", "timestamp")
    setup_stages = ("train_sasrec",)  # the recommender behind get_recommendations_by_history
    load_options = ("recommend_history", "user_profiles")
    prompt_options = ("history_line",)
    history_line = "title_first"  # the default of a task not configured by a stage
    # Small models echo the tool list instead of calling a tool; opening the assistant turn
    # with the call's first key makes every answer a call.
    response_prefix = '{"name": "'
    call_schema = {name: (arg, "string_list" if schema["type"] == "array" else "string")
                   for name, (_, arg, schema, _) in TOOLS.items()}

    def load(self, data_dir: Path, *, include_history_samples: bool = False, on_error: str = "stop",
             **options: Any) -> Benchmark:
        return load_pwab(data_dir, include_history_samples=include_history_samples, on_error=on_error, **options)

    def prompt(self, sample, history, tokenizer=None, max_prompt_tokens=DEFAULT_MAX_PROMPT_TOKENS) -> str:
        return build_pwab_prompt(sample, history, tokenizer, max_prompt_tokens, history_line=self.history_line)

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
