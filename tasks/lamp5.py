"""LaMP-5: personalized scholarly title generation (time-based split).

A sample's input is ``"Generate a title for the following abstract of a paper: <abstract>"``,
its output the title the author gave the paper; profile items are ``{id, abstract, title,
date?}`` in the LaMP file layout (:mod:`tasks.lamp_format`).
"""

from __future__ import annotations

from tasks.lamp_format import LampTask


class Lamp5(LampTask):
    name = "lamp5"
    summary = "LaMP-5 scholarly title generation"
    defaults = {"include_history_samples": True, "history_k": 5, "max_new_tokens": 32, "threshold": 0.15,
                "lora_prompt": "zeroshot"}
    header = "Titles this author gave earlier papers:"
    instruction = "Generate a title for the following abstract of a paper: "
    answer_name, text_name, input_field = "title", "abstract", "abstract"


TASK = Lamp5()
