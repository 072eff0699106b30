"""Contrast-pair collection (stage 03), one collector per kind of task.

A task names its collector (``Task.pair_collector``); every collector is built as
``Collector(cfg, task, other_samples, model, tok)`` and turns one chunk of samples into
its pairs and done-markers (``chunk``) and the done-markers of a whole run into its
summary (``summarize``); see :mod:`collect.loop`.
"""

from __future__ import annotations

from collect.pairs import TextCollector
from collect.pwab_pairs import PwabCollector

COLLECTORS = {"rouge": TextCollector, "tool_calls": PwabCollector}
