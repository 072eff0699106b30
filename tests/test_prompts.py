"""Prompt builders: question first-class, history compact, budget respected."""

from __future__ import annotations

import pytest

from tasks import get_task


def build_prompt(task, sample, history, tokenizer=None, max_prompt_tokens=1024):
    return get_task(task).prompt(sample, history, tokenizer, max_prompt_tokens)


def postprocess(task, text):
    return get_task(task).postprocess(text)

ARTICLE = "Boxes is an extremely configurable filter for adding ASCII art around chunks of text."
LAMP_SAMPLE = {"id": "u1-boxes", "user_id": "u1", "output": "box drawing filter", "history": [],
               "input": f"Generate a headline for the following article: {ARTICLE}"}
LONG_SAMPLE = {"id": "u1-boxes", "user_id": "u1", "output": ARTICLE, "history": [],
               "input": 'Generate an abstract for the title "box drawing filter".'}
HISTORY = [{"id": f"u1-h{i}", "input": f"article number {i} " + "word " * 60, "output": f"title {i}"}
           for i in range(5)]


def count(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_lamp4_prompt_without_history_is_the_question_alone():
    prompt = build_prompt("lamp4", LAMP_SAMPLE, [])
    assert prompt.startswith(f"Generate a headline for the following article: {ARTICLE}")
    assert "Headline:" not in prompt


def test_lamp4_history_items_are_listed_compactly_above_the_question():
    prompt = build_prompt("lamp4", LAMP_SAMPLE, HISTORY[:2], max_prompt_tokens=10_000)
    assert 'Headline: "title 0" for article: "article number 0 word' in prompt
    assert prompt.index("title 0") < prompt.index("title 1") < prompt.index(ARTICLE)


def test_history_items_given_as_whole_samples_lose_their_instruction_prefix():
    as_sample = {"id": "u2-x", "input": "Generate a headline for the following article: some text",
                 "output": "a title"}
    prompt = build_prompt("lamp4", LAMP_SAMPLE, [as_sample])
    assert 'Headline: "a title" for article: "some text"' in prompt


def test_longlamp_prompt_asks_for_the_abstract_of_the_title_and_lists_abstracts():
    item = {"id": "u1-h", "input": "tiny personal calendar", "output": "A minimalistic calendar."}
    prompt = build_prompt("longlamp", LONG_SAMPLE, [item])
    assert 'Abstract: "A minimalistic calendar." for title: "tiny personal calendar"' in prompt
    assert prompt.rstrip().endswith('Generate an abstract for the title "box drawing filter".\n'
                                    "Write only the abstract.")


@pytest.mark.parametrize("budget", [40, 80, 150, 300])
def test_truncation_fits_the_budget_and_cuts_the_question_only_when_it_alone_is_over(tiny_llama, budget):
    _, tok = tiny_llama
    question = build_prompt("lamp4", LAMP_SAMPLE, [], tok)
    prompt = build_prompt("lamp4", LAMP_SAMPLE, HISTORY, tok, max_prompt_tokens=budget)
    assert count(tok, prompt) <= budget
    assert prompt.endswith(question) == (count(tok, question) <= budget)
    assert get_task("lamp4").input_cut(LAMP_SAMPLE, tok, budget) == (count(tok, question) > budget)


def test_history_is_shortened_before_items_are_dropped(tiny_llama):
    _, tok = tiny_llama
    full = build_prompt("lamp4", LAMP_SAMPLE, HISTORY, tok, max_prompt_tokens=100_000)
    prompt = build_prompt("lamp4", LAMP_SAMPLE, HISTORY, tok, max_prompt_tokens=count(tok, full) * 2 // 3)
    assert all(f"title {i}" in prompt for i in range(5))  # all kept, each shorter
    assert " ..." in prompt


def test_least_relevant_items_are_dropped_first_under_a_tight_budget(tiny_llama):
    _, tok = tiny_llama
    question = build_prompt("lamp4", LAMP_SAMPLE, [], tok)
    prompt = build_prompt("lamp4", LAMP_SAMPLE, HISTORY, tok, max_prompt_tokens=count(tok, question) + 120)
    kept = [i for i in range(5) if f"title {i}" in prompt]
    assert kept == list(range(len(kept))) and 0 < len(kept) < 5


@pytest.mark.parametrize("task, budget", [("lamp4", 200), ("longlamp", 200), ("pwab", 1200)])
def test_a_huge_question_is_cut_from_the_end_of_the_article_keeping_the_instruction(tiny_llama, task, budget):
    _, tok = tiny_llama
    words = [f"w{i}" for i in range(400_000)]  # ~2.5 MB of text
    text = {"lamp4": "Generate a headline for the following article: ",
            "longlamp": 'Generate an abstract for the title "', "pwab": ""}[task] + " ".join(words)
    sample = {**(LONG_SAMPLE if task == "longlamp" else LAMP_SAMPLE), "input": text}
    prompt = build_prompt(task, sample, HISTORY, tok, max_prompt_tokens=budget)
    assert budget - 50 < count(tok, prompt) <= budget and get_task(task).input_cut(sample, tok, budget)
    assert "w0 w1 w2" in prompt and " .." in prompt and "w399999" not in prompt  # the end is cut
    assert "title 0" not in prompt  # the question took the whole budget: no history
    ending = {"lamp4": "Write only the headline.", "longlamp": "Write only the abstract.", "pwab": "User request:"}
    assert ending[task] in prompt and not get_task(task).input_cut(LAMP_SAMPLE, tok, budget)


def test_word_counts_stand_in_for_tokens_without_a_tokenizer():
    prompt = build_prompt("longlamp", LONG_SAMPLE, HISTORY, max_prompt_tokens=120)
    assert len(prompt.split()) <= 120


def test_unknown_task_suggests_the_closest_one():
    with pytest.raises(ValueError, match="Did you mean 'lamp4'"):
        build_prompt("lamp-4", LAMP_SAMPLE, [])


def test_pwab_prompts_are_delegated_to_the_pwab_builder(monkeypatch):
    import tasks.pwab as pwab

    calls = []
    monkeypatch.setattr(pwab, "build_pwab_prompt", lambda *args, **kw: calls.append((args, kw)) or "PWAB")
    assert build_prompt("pwab", {"input": "x"}, [], None, 77) == "PWAB"
    assert calls == [(({"input": "x"}, [], None, 77), {"history_line": "title_first"})]


@pytest.mark.parametrize("text, expected", [
    ("Headline: \"Box drawing filter\"\nmore text", "Box drawing filter"),
    ("\n\n  **Headline:** Box drawing filter  ", "Box drawing filter"),
    ("Headline:\n'Box drawing filter'", "Box drawing filter"),
    ("“Box drawing filter”", "Box drawing filter"),
    ("title: box", "box"),
    ("", ""),
])
def test_headline_postprocess_takes_the_first_line_without_label_or_quotes(text, expected):
    assert postprocess("lamp4", text) == expected


def test_abstract_postprocess_keeps_all_text_and_pwab_keeps_the_canonical_call():
    assert postprocess("longlamp", "  line one\nline two \n") == "line one\nline two"
    fenced = 'Sure:\n```json\n{"name": "add_product_review", "arguments": {"review": "Great."}}\n```'
    assert postprocess("pwab", fenced) == '{"name": "add_product_review", "arguments": {"review": "Great."}}'
    assert postprocess("pwab", " not a call ") == "not a call"  # kept, so scoring counts the failure
