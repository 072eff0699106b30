"""What a benchmark task is: everything the pipeline needs to know about one benchmark.

A :class:`Task` loads the benchmark's raw files into samples, says what text of a sample
is its retrieval query, writes the user message for a sample and a list of history items,
turns a generation into the answer that is scored, scores a run, and carries the task's
defaults for stage settings (``history_k``, ``max_new_tokens``, pair thresholds, ...).
Nothing outside ``tasks/`` knows which benchmark it runs.

:class:`TextTask` is the shape of the text-generation tasks (LaMP-4, LaMP-5, LongLaMP):
a header and one line per history item above the question; the prompt is fitted to a
token budget by shortening the items' long fields first and dropping the least relevant
items next.  A question that alone exceeds the budget (a 5 MB article) is cut from the
end of the sample's text, its instruction kept (:func:`fit_text`); stages count such
prompts (:meth:`Task.input_cut`) in their summary.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from data_process.records import Benchmark
from eval.report import TEXT_METRICS, score_records

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 1024
MIN_ITEM_TOKENS = 8  # a history item shorter than this says nothing useful: drop it instead
# A text with this many characters per token of the budget is over it (tokens are rarely
# longer), so only that much of a huge text is tokenized.
MAX_TOKEN_CHARS = 32


class Task:
    """One benchmark.  Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Stage settings this task decides unless a config or flag does (field name -> value).
    defaults: ClassVar[dict[str, Any]] = {}
    metrics: ClassVar[tuple[str, ...]] = TEXT_METRICS
    # The metric scripts/tune.py chooses settings by (one of ``metrics``).
    selection_metric: ClassVar[str] = "rougeL"
    # How stage 03 judges a try (a key of ``collect.COLLECTORS``).
    pair_collector: ClassVar[str] = "rouge"
    # Sample fields that generation records carry besides id, user, prompt and gold.
    record_fields: ClassVar[tuple[str, ...]] = ()
    # Scripts that build the task's environment before pair collection (run by run.sh).
    setup_stages: ClassVar[tuple[str, ...]] = ()
    # Stage 01 settings that :meth:`load` takes as keyword arguments (besides the two below).
    load_options: ClassVar[tuple[str, ...]] = ()
    # Prompt settings (fields of the stages' ``prompt`` section) that :meth:`prompt` reads
    # from the task; stages hand them over through :meth:`configured` (see
    # ``stages.common.task_of``), so 03, 05 and train_lora write the same prompts.
    prompt_options: ClassVar[tuple[str, ...]] = ()
    # Text every answer starts with, written into the prompt after the assistant's turn
    # marker (stages 03, 04 and 05 alike), e.g. '{"name": "' for a tool call.
    response_prefix: ClassVar[str] = ""
    # For constrained decoding (--constrained): function name -> (argument name, kind), kind
    # "string" or "string_list"; None: the task's answers are free text.
    call_schema: ClassVar[dict[str, tuple[str, str]] | None] = None

    def configured(self, **options: Any) -> Task:
        """This task with the ``prompt_options`` among ``options`` set (``None``: the task's
        own default); ``self`` when nothing changes, else a copy (tasks are shared)."""
        changed = {k: v for k, v in options.items()
                   if k in self.prompt_options and v is not None and v != getattr(self, k)}
        if not changed:
            return self
        task = copy.copy(self)
        for name, value in changed.items():
            setattr(task, name, value)
        return task

    def load(self, data_dir: Path, *, include_history_samples: bool = True, on_error: str = "stop",
             **options: Any) -> Benchmark:
        """The benchmark's training and test samples (history in time order, no leakage)."""
        raise NotImplementedError

    def query(self, sample: dict[str, Any]) -> str:
        """The text of ``sample`` that its history and pairs are retrieved with."""
        return sample["input"]

    def prompt(self, sample: dict[str, Any], history: list[dict[str, Any]], tokenizer=None,
               max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS) -> str:
        """The user message for ``sample`` with ``history`` items (most relevant first) above it."""
        raise NotImplementedError

    def input_cut(self, sample: dict[str, Any], tokenizer=None,
                  max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS) -> bool:
        """Whether :meth:`prompt` cuts the sample's own text: without any history it is over budget."""
        return False

    def postprocess(self, text: str) -> str:
        """The answer in a generated text (what is scored and compared with the gold)."""
        return (text or "").strip()

    def evaluate(self, records: list[dict[str, Any]], *, data_dir: str, run_dir: Path) -> dict[str, Any]:
        """Scores of a run's generation records: ``overall``, ``per_user``, ``per_sample``, ..."""
        return score_records(records)


def count_cut_inputs(task: Task, samples: list[dict[str, Any]], tokenizer, budget: int, stage: str) -> int:
    """How many of ``samples`` get prompts whose own text is cut (:meth:`Task.input_cut`), logged."""
    n = sum(task.input_cut(s, tokenizer, budget) for s in samples)
    if n:
        log.warning("[%s] %d of %d prompt(s) were cut: the sample's text alone exceeds --max-prompt-tokens %d "
                    "(cut from its end; no history fits)", stage, n, len(samples), budget)
    return n


def token_counter(tokenizer) -> Callable[[str], int]:
    """Counts tokens with ``tokenizer``, or whitespace words without one (a rough stand-in)."""
    if tokenizer is None:
        return lambda text: len(text.split())
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def shorten(text: str, n_tokens: int, tokenizer) -> str:
    """``text`` cut to at most ``n_tokens`` (the " ..." that marks the cut included)."""
    if tokenizer is None:
        words = text.split()
        return text if len(words) <= n_tokens else " ".join(words[:max(n_tokens - 1, 1)]) + " ..."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= n_tokens:
        return text
    mark = len(tokenizer(" ...", add_special_tokens=False)["input_ids"])
    return tokenizer.decode(ids[:max(n_tokens - mark, 1)]).rstrip() + " ..."


def fit_text(text: str, render: Callable[[str], str], tokenizer, budget: int) -> tuple[str, bool]:
    """``(render(text), False)`` when it fits ``budget`` tokens; else ``(render(cut), True)``
    with ``text`` cut from its end (" ..." marks the cut) until it fits.  What ``render``
    adds around the text is never cut."""
    count = token_counter(tokenizer)
    head = text[: budget * MAX_TOKEN_CHARS]
    if head != text and count(render(head)) > budget:
        text = head  # surely over budget: cut the head only (tokenizing megabytes takes seconds)
    rendered = render(text)
    over = count(rendered) - budget
    if over <= 0:
        return rendered, False
    n = count(text) - over - 2  # 2: re-tokenizing joined text may add a token
    while over > 0 and n > 1:
        rendered = render(shorten(text, n, tokenizer))
        over = count(rendered) - budget
        n -= max(over, 1)
    return (rendered if over <= 0 else render(shorten(text, 1, tokenizer))), True


class TextTask(Task):
    """A text-generation task: history lines ``item(short, long)`` under ``header``.

    Subclasses give ``header``, :meth:`question` (sample input -> question text),
    :meth:`item` and :meth:`fields` (history item -> its short and long field).
    """

    header: ClassVar[str]

    def question(self, text: str) -> str:
        raise NotImplementedError

    def item(self, short: str, long: str) -> str:
        raise NotImplementedError

    def fields(self, item: dict[str, Any]) -> tuple[str, str]:
        raise NotImplementedError

    def prompt(self, sample, history, tokenizer=None, max_prompt_tokens=DEFAULT_MAX_PROMPT_TOKENS) -> str:
        if "input" not in sample:
            raise ValueError(f"sample {sample.get('id', '?')!r}: missing field 'input'")
        question, _ = fit_text(sample["input"], self.question, tokenizer, max_prompt_tokens)
        try:
            pairs = [self.fields(item) for item in history]
        except KeyError as err:
            raise ValueError(f"sample {sample.get('id', '?')!r}: a history item lacks field {err}") from None
        return self._fit(question, pairs, tokenizer, max_prompt_tokens)

    def input_cut(self, sample, tokenizer=None, max_prompt_tokens=DEFAULT_MAX_PROMPT_TOKENS) -> bool:
        return fit_text(sample["input"], self.question, tokenizer, max_prompt_tokens)[1]

    def _render(self, question: str, lines: list[str]) -> str:
        if not lines:
            return question
        return self.header + "\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + question

    def _fit(self, question: str, pairs: list[tuple[str, str]], tokenizer, budget: int) -> str:
        """Shorten long fields, then drop the least relevant items, until the prompt fits."""
        count = token_counter(tokenizer)
        lines = [self.item(short, long) for short, long in pairs]
        if count(self._render(question, lines)) <= budget:
            return self._render(question, lines)
        overhead = count("- " + self.item("", "") + "\n")
        spare = budget - count(self._render(question, [self.item("", "")])) + overhead
        n = len(pairs)  # keep the most relevant items that each still get a useful share
        while n and spare // n - overhead < 2 * MIN_ITEM_TOKENS:
            n -= 1
        lines = []
        for short, long in pairs[:n]:
            room = spare // n - overhead - 2  # 2: re-tokenizing joined text may add a token
            short = shorten(short, max(room // 2, MIN_ITEM_TOKENS), tokenizer)
            long = shorten(long, max(room - count(short), MIN_ITEM_TOKENS), tokenizer)
            lines.append(self.item(short, long))
        while lines and count(self._render(question, lines)) > budget:
            lines.pop()  # history is most relevant first: drop from the end
        return self._render(question, lines)
