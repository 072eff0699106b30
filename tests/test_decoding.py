"""Tool-call decoding: the response prefix in 03/04/05, and constrained decoding of calls."""

from __future__ import annotations

from collections import Counter

import pytest

from eval.pwab_tools import TOOLS, format_tool_call, parse_tool_call
from steering.decoding import ToolCallConstraint, decoding_kwargs
from steering.extract import encode_pair
from steering.generation import eos_ids, generate
from steering.inputs import chat_prompt
from tasks import get_task

PWAB, LAMP4 = get_task("pwab"), get_task("lamp4")
MESSAGES = ["Find me a Sony wireless headphones, please.", "Based on my purchase history, what should I buy next?",
            "Please write a review of the french press I just received.", "json", "a b c d e f g"]


@pytest.fixture(scope="module")
def constraint(tiny_llama):
    model, tok = tiny_llama
    return ToolCallConstraint(tok, PWAB.call_schema, eos_ids(model, tok))


def test_the_pwab_call_schema_covers_every_tool():
    assert set(PWAB.call_schema) == set(TOOLS)
    assert PWAB.call_schema["get_recommendations_by_history"] == ("product_sequence", "string_list")
    assert PWAB.response_prefix == '{"name": "' and LAMP4.response_prefix == ""


def test_the_grammar_state_follows_a_call_from_name_to_end(constraint):
    assert constraint.state("")[0] == "literal" and len(constraint.state("")[1]) == 3
    assert constraint.state("add_")[1] == ('product_review", "arguments": {"review": "',)
    assert constraint.state("nope")[0] == "invalid"
    head = 'search_product_by_query", "arguments": {"query": "'
    assert constraint.state(head + "red shoes")[:2] == ("string", ('"}}',))
    assert constraint.state(head + 'red"}')[:2] == ("literal", ("}",))
    assert constraint.state(head + 'red"}}')[0] == "done"
    items = 'get_recommendations_by_history", "arguments": {"product_sequence": ["B01", "B0'
    assert constraint.state(items)[:2] == ("string", ('", "', '"]}}'))
    assert constraint.state(items + '2"]')[:2] == ("literal", ("}}",))


def test_allowed_tokens_never_break_the_json(constraint):
    head = 'search_product_by_query", "arguments": {"query": "'
    allowed = constraint.allowed(head + "red", steps_left=50).nonzero().flatten().tolist()
    for i in allowed:
        piece = constraint.pieces[i]
        quote = piece.find('"')
        assert "\\" not in piece and (quote < 0 or '"}}'.startswith(piece[quote:]))
    # an empty string may not close at once; near the token budget only closing tokens remain
    empty = constraint.allowed(head, steps_left=50)
    assert not any(constraint.pieces[i].startswith('"') for i in empty.nonzero().flatten().tolist())
    closing = constraint.allowed(head + "red", steps_left=2).nonzero().flatten().tolist()
    assert closing and all('"' in constraint.pieces[i] for i in closing)
    assert constraint.allowed(head + 'red"}}', steps_left=9).nonzero().flatten().tolist() == constraint.eos_ids
    # a list near the budget closes instead of opening another item
    items = 'get_recommendations_by_history", "arguments": {"product_sequence": ["B01'
    pieces = lambda mask: {constraint.pieces[i] for i in mask.nonzero().flatten().tolist()}  # noqa: E731
    assert any(p.startswith(",") for p in pieces(constraint.allowed(items + '"', steps_left=30)))
    assert pieces(constraint.allowed(items + '"', steps_left=3)) and \
        all('"]}}'[1:].startswith(p) for p in pieces(constraint.allowed(items + '"', steps_left=3)))
    assert not any('",' in p for p in pieces(constraint.allowed(items, steps_left=3)))


@pytest.mark.parametrize("model_name, max_new_tokens", [("llama", 96), ("qwen2", 96), ("llama", 64)])
def test_constrained_decoding_makes_a_random_model_write_canonical_calls(request, model_name, max_new_tokens):
    model, tok = request.getfixturevalue(f"tiny_{model_name}")  # 64 tokens: strings close before the budget ends
    free = generate(model, tok, MESSAGES, max_new_tokens=24, **decoding_kwargs(PWAB, model, tok, False))
    assert sum(parse_tool_call(t) is not None for t in free) < len(MESSAGES)  # a random model writes no calls
    texts = generate(model, tok, MESSAGES, max_new_tokens=max_new_tokens, batch_size=2,
                     **decoding_kwargs(PWAB, model, tok, True))
    failures: Counter = Counter()
    calls = [parse_tool_call(t, failures) for t in texts]
    assert not failures and all(c is not None for c in calls)
    assert texts == [format_tool_call(c) for c in calls]  # exactly the canonical JSON of the pairs and gold


def test_the_response_prefix_opens_the_assistant_turn_and_the_answer(tiny_llama):
    model, tok = tiny_llama
    assert chat_prompt(tok, "hi", PWAB.response_prefix) == chat_prompt(tok, "hi") + PWAB.response_prefix
    answers = generate(model, tok, MESSAGES[:2], max_new_tokens=4, **decoding_kwargs(PWAB, model, tok, False))
    assert all(a.startswith(PWAB.response_prefix) for a in answers)


def test_extraction_reads_the_answer_after_the_prefix_on_the_generation_token_stream(tiny_llama):
    _, tok = tiny_llama
    chosen = '{"name": "add_product_review", "arguments": {"review": "great"}}'
    pair = {"pair_id": "p", "prompt": "Review it.", "chosen": chosen, "rejected": chosen.replace("great", "bad")}
    seq, _ = encode_pair(tok, pair, 64, PWAB.response_prefix)
    context = tok(chat_prompt(tok, "Review it.", PWAB.response_prefix), add_special_tokens=False)["input_ids"]
    assert seq.ids[:seq.answer_start] == context
    assert tok.decode(seq.ids[seq.answer_start:]) == chosen[len(PWAB.response_prefix):]
    with pytest.raises(ValueError, match="does not start with the task's response prefix"):
        encode_pair(tok, {**pair, "rejected": "plain text"}, 64, PWAB.response_prefix)


def test_constraining_a_free_text_task_is_an_error(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="free-text answers"):
        decoding_kwargs(LAMP4, model, tok, True)
