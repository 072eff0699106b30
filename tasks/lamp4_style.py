"""LaMP-4 with a known style per user: the positive control (``tests/fixtures/style``).

The benchmark is LaMP-4 (same layout, prompt and headline post-processing) where every
user writes all of their headlines, history and golds alike, under one machine-checkable
style rule recorded in ``rules.json`` beside the files (:mod:`eval.style`).  Its metric
``style_adherence`` (the share of a user's answers that follow that user's rule) says
whether a method picked up the user's style; ``scripts/tune.py`` selects on it.
"""

from __future__ import annotations

from typing import Any

from eval.report import TEXT_METRICS, score_records
from eval.style import RULES_FILE, add_style_adherence, load_rules
from tasks.lamp4 import Lamp4


class Lamp4Style(Lamp4):
    name = "lamp4_style"
    summary = "LaMP-4 headlines with one known style rule per user (positive control)"
    # threshold 1.0: stage 03 keeps every try but one the gold's words match exactly.  The
    # best contrast for a style is a try with the gold's content and without its rule,
    # which LaMP-4's 0.15 (a content threshold) would drop first.
    defaults = {**Lamp4.defaults, "threshold": 1.0}
    metrics = (*TEXT_METRICS, "style_adherence")
    selection_metric = "style_adherence"

    def evaluate(self, records: list[dict[str, Any]], *, data_dir: str, run_dir) -> dict[str, Any]:
        rules = load_rules(data_dir)
        return add_style_adherence(score_records(records), records, rules, where=f"{data_dir}/{RULES_FILE}")


TASK = Lamp4Style()
