"""LaMP-4: personalized news headline generation (time-based split).

A sample's input is ``"Generate a headline for the following article: <article>"``, its
output the headline the user wrote; profile items are ``{id, text, title, date?}``.
"""

from __future__ import annotations

from tasks.lamp_format import LampTask


class Lamp4(LampTask):
    name = "lamp4"
    summary = "LaMP-4 news headline generation"
    defaults = {"include_history_samples": True, "history_k": 5, "max_new_tokens": 32, "threshold": 0.15,
                "lora_prompt": "zeroshot"}
    header = "Headlines this author wrote for earlier articles:"
    instruction = "Generate a headline for the following article: "
    answer_name, text_name, input_field = "headline", "article", "text"


TASK = Lamp4()
