"""Contrast-pair collection (stage 03), one collector per kind of task.

A task names its collector (``Task.pair_collector``); every collector is
``collector(cfg, task, samples, other_samples, model, tok, writer) -> summary``, and its
summary of a whole run is ``SUMMARIES[name](done_markers, users)``.
"""

from __future__ import annotations

from collect.pairs import collect_text_pairs, summarize
from collect.pwab_pairs import collect_pwab_pairs, summarize_pwab

COLLECTORS = {"rouge": collect_text_pairs, "tool_calls": collect_pwab_pairs}
SUMMARIES = {"rouge": summarize, "tool_calls": summarize_pwab}
