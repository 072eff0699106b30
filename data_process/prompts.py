"""Prompt builders per task, shared by pair collection, extraction and generation.

:func:`build_prompt` returns the *user message* (the chat template is applied later by
:func:`steering.model.chat_prompt`).  With history items it lists them compactly above
the question, most relevant first, e.g. for LaMP-4::

    Headlines this author wrote for earlier articles:
    - Headline: "tiny personal calendar" for article: "Minimalistic personal calendar. ..."

    Generate a headline for the following article: <article>
    Write only the headline.

To fit ``max_prompt_tokens`` the history items' long fields (article, abstract) are
shortened first and the least relevant items are dropped next; the question itself is
never cut (a question longer than the budget is returned whole, without history).
Counts use ``tokenizer`` when given, else whitespace words (a rough stand-in).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_process.config import choose

DEFAULT_MAX_PROMPT_TOKENS = 1024
MIN_ITEM_TOKENS = 8  # a history item shorter than this says nothing useful: drop it instead

_HEADLINE_ASK = re.compile(r"^\s*generate a headline for the following article\s*:\s*", re.IGNORECASE)
_ABSTRACT_ASK = re.compile(r'^\s*generate an abstract for the title\s*"(.*)"\s*\.?\s*$',
                           re.IGNORECASE | re.DOTALL)
_ANSWER_LABEL = re.compile(r"^[\s*#]*(?:headline|title|answer)[\s*]*:[\s*]*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`*"


def _article(text: str) -> str:
    """The article of a LaMP-4 input (the instruction prefix removed when present)."""
    return _HEADLINE_ASK.sub("", text, count=1).strip()


def _title(text: str) -> str:
    """The title of a LongLaMP input (``Generate an abstract for the title "X".`` -> X)."""
    match = _ABSTRACT_ASK.match(text)
    return (match.group(1) if match else text).strip()


@dataclass(frozen=True)
class TaskPrompt:
    """How one text task phrases its question and its history items."""

    header: str
    question: Callable[[str], str]       # sample input -> question text
    item: Callable[[str, str], str]      # (short field, long field) -> one history line
    fields: Callable[[dict], tuple[str, str]]  # history item -> (short field, long field)


TASK_PROMPTS: dict[str, TaskPrompt] = {
    "lamp4": TaskPrompt(
        header="Headlines this author wrote for earlier articles:",
        question=lambda text: f"Generate a headline for the following article: {_article(text)}\n"
                              "Write only the headline.",
        item=lambda title, article: f'Headline: "{title}" for article: "{article}"',
        fields=lambda item: (item["output"].strip(), _article(item["input"]))),
    "longlamp": TaskPrompt(
        header="Abstracts this author wrote for earlier papers:",
        question=lambda text: f'Generate an abstract for the title "{_title(text)}".\n'
                              "Write only the abstract.",
        item=lambda title, abstract: f'Abstract: "{abstract}" for title: "{title}"',
        fields=lambda item: (_title(item["input"]), item["output"].strip())),
}


def _counter(tokenizer) -> Callable[[str], int]:
    if tokenizer is None:
        return lambda text: len(text.split())
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _shorten(text: str, n_tokens: int, tokenizer) -> str:
    """``text`` cut to at most ``n_tokens`` (the " ..." that marks the cut included)."""
    if tokenizer is None:
        words = text.split()
        return text if len(words) <= n_tokens else " ".join(words[:max(n_tokens - 1, 1)]) + " ..."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= n_tokens:
        return text
    mark = len(tokenizer(" ...", add_special_tokens=False)["input_ids"])
    return tokenizer.decode(ids[:max(n_tokens - mark, 1)]).rstrip() + " ..."


def _render(spec: TaskPrompt, question: str, lines: list[str]) -> str:
    if not lines:
        return question
    return spec.header + "\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + question


def _fit(spec: TaskPrompt, question: str, pairs: list[tuple[str, str]], tokenizer, budget: int) -> str:
    """Shorten long fields, then drop the least relevant items, until the prompt fits."""
    count = _counter(tokenizer)
    lines = [spec.item(short, long) for short, long in pairs]
    if count(_render(spec, question, lines)) <= budget:
        return _render(spec, question, lines)
    overhead = count("- " + spec.item("", "") + "\n")
    spare = budget - count(_render(spec, question, [spec.item("", "")])) + overhead
    n = len(pairs)  # keep the most relevant items that each still get a useful share
    while n and spare // n - overhead < 2 * MIN_ITEM_TOKENS:
        n -= 1
    lines = []
    for short, long in pairs[:n]:
        room = spare // n - overhead - 2  # 2: re-tokenizing joined text may add a token
        short = _shorten(short, max(room // 2, MIN_ITEM_TOKENS), tokenizer)
        long = _shorten(long, max(room - count(short), MIN_ITEM_TOKENS), tokenizer)
        lines.append(spec.item(short, long))
    while lines and count(_render(spec, question, lines)) > budget:
        lines.pop()  # history is most relevant first: drop from the end
    return _render(spec, question, lines)


def build_prompt(task: str, sample: dict[str, Any], history: list[dict[str, Any]], tokenizer=None,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS) -> str:
    """The user message for ``sample`` with ``history`` items (``[]`` for none) above it.

    ``task`` is ``lamp4`` (headline), ``longlamp`` (abstract) or ``pwab`` (delegated to
    :func:`data_process.pwab.build_pwab_prompt`).  History items are ``{input, output}``
    dicts (history entries or whole samples), most relevant first.
    """
    if task == "pwab":
        from data_process.pwab import build_pwab_prompt  # PersonalWAB module, imported on use

        return build_pwab_prompt(sample, history, tokenizer, max_prompt_tokens)
    spec = choose("task", task, {**TASK_PROMPTS, "pwab": None})
    if "input" not in sample:
        raise ValueError(f"sample {sample.get('id', '?')!r}: missing field 'input'")
    question = spec.question(sample["input"])
    try:
        pairs = [spec.fields(item) for item in history]
    except KeyError as err:
        raise ValueError(f"sample {sample.get('id', '?')!r}: a history item lacks field {err}") from None
    return _fit(spec, question, pairs, tokenizer, max_prompt_tokens)


def _headline(text: str) -> str:
    for line in text.splitlines():
        line = _ANSWER_LABEL.sub("", line.strip(), count=1).strip().strip(_QUOTES).strip()
        if line:  # a bare "Headline:" line is followed by the headline itself
            return line
    return ""


POSTPROCESS: dict[str, Callable[[str], str]] = {
    "lamp4": _headline,
    "longlamp": lambda text: text.strip(),
    "pwab": lambda text: _pwab_call(text),
}


def _pwab_call(text: str) -> str:
    from data_process.pwab import call_text  # PersonalWAB module, imported on use

    return call_text(text)


def postprocess(task: str, text: str) -> str:
    """The task's answer in a generated text (headline line, abstract, PersonalWAB call)."""
    return choose("task", task, POSTPROCESS)(text or "")
