"""Batched generation: input order, equality with one-by-one decoding, answer clean-up."""

from __future__ import annotations

import pytest
import torch

from data_process.text import json_objects
from steering.generation import (
    clean_output,
    generate,
    generate_batches,
    prefix_groups,
    prefix_sharing_supported,
)

MESSAGES = [
    "the quick brown fox",
    "Generate a headline for the following article: Debian package maintainers write short descriptions.",
    "json",
    "A library for parsing JSON files and a tool to convert images between formats, user history item review.",
    "steering vectors",
]


def test_batched_generation_keeps_input_order_and_equals_one_by_one_greedy(tiny_model):
    model, tok = tiny_model
    batched = generate(model, tok, MESSAGES, max_new_tokens=8, batch_size=3)
    alone = [generate(model, tok, [m], max_new_tokens=8, batch_size=1)[0] for m in MESSAGES]
    assert batched == alone
    assert len(set(batched)) > 1  # the comparison is not trivially between identical texts


def test_batch_size_does_not_change_greedy_results(tiny_llama):
    model, tok = tiny_llama
    assert (generate(model, tok, MESSAGES, max_new_tokens=6, batch_size=2)
            == generate(model, tok, MESSAGES, max_new_tokens=6, batch_size=16))


def test_empty_message_list_returns_empty_list(tiny_llama):
    model, tok = tiny_llama
    assert generate(model, tok, [], max_new_tokens=4) == []


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(tiny_llama):
    model, tok = tiny_llama
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=5.0, batch_size=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = generate(model, tok, MESSAGES, seed=7, **kwargs)
    assert torch.rand(1) == before
    assert generate(model, tok, MESSAGES, seed=7, **kwargs) == first
    others = [generate(model, tok, MESSAGES, seed=s, **kwargs) for s in (8, 9)]
    assert any(o != first for o in others)


def test_a_sampled_answer_depends_on_its_prompt_and_seed_not_on_its_batch(tiny_llama):
    model, tok = tiny_llama
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=5.0, top_p=0.9, seed=7)
    together = generate(model, tok, MESSAGES, batch_size=16, **kwargs)
    assert generate(model, tok, MESSAGES, batch_size=1, **kwargs) == together
    # The same prompt in another list, at another place, on another worker: same answer.
    assert generate(model, tok, MESSAGES[::-1][:2], batch_size=2, **kwargs) == together[::-1][:2]
    assert len(set(together)) > 1


def test_a_shorter_max_new_tokens_gives_a_prefix_of_the_longer_answer(tiny_llama):
    model, tok = tiny_llama
    short = generate(model, tok, MESSAGES, max_new_tokens=3)
    long = generate(model, tok, MESSAGES, max_new_tokens=10)
    assert all(lo.startswith(sh) for sh, lo in zip(short, long, strict=True))
    assert any(len(lo) > len(sh) for sh, lo in zip(short, long, strict=True))


def test_text_after_a_rows_eos_is_never_returned(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    real = model.generate
    tail = tok(" fox", add_special_tokens=False)["input_ids"]

    def generate_then_junk(*args, **kwargs):
        out = real(*args, **kwargs)  # an EOS followed by tokens a buggy cut would keep
        extra = torch.tensor([[tok.eos_token_id] + tail] * out.shape[0])
        return torch.cat([out, extra], dim=1)

    monkeypatch.setattr(model, "generate", generate_then_junk)
    with_junk = generate(model, tok, MESSAGES, max_new_tokens=4)
    monkeypatch.undo()
    assert with_junk == generate(model, tok, MESSAGES, max_new_tokens=4)


def test_per_row_deltas_must_have_one_row_per_message(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="one row per message"):
        generate(model, tok, MESSAGES, max_new_tokens=2, deltas={"attn.0": torch.zeros(2, 32)})


def test_zero_deltas_give_the_unsteered_output(tiny_llama):
    pytest.importorskip("steering.hooks")
    model, tok = tiny_llama
    plain = generate(model, tok, MESSAGES, max_new_tokens=6, batch_size=2)
    zeros = {"attn.1": torch.zeros(len(MESSAGES), 32), "mlp.1": torch.zeros(len(MESSAGES), 32)}
    assert generate(model, tok, MESSAGES, max_new_tokens=6, batch_size=2, deltas=zeros) == plain


def test_large_deltas_on_one_row_change_only_that_row(tiny_llama):
    pytest.importorskip("steering.hooks")
    model, tok = tiny_llama
    plain = generate(model, tok, MESSAGES, max_new_tokens=6, batch_size=2)
    deltas = torch.zeros(len(MESSAGES), 32)
    deltas[1] = 50.0 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    steered = generate(model, tok, MESSAGES, max_new_tokens=6, batch_size=2, deltas={"block.0": deltas})
    assert steered[1] != plain[1]
    assert [s for i, s in enumerate(steered) if i != 1] == [p for i, p in enumerate(plain) if i != 1]


@pytest.mark.parametrize("text, expected", [
    ("  A headline  \n", "A headline"),
    ("assistant\nA headline", "A headline"),
    ("Assistant: A headline", "A headline"),
    ("<|im_start|>assistant\nA headline", "A headline"),
    ("model\nA headline", "A headline"),
    ("Model: a headline about models", "Model: a headline about models"),
    ("", ""),
])
def test_answers_strip_and_drop_echoed_role_markers(text, expected):
    assert clean_output(text) == expected


@pytest.mark.parametrize("text, expected", [
    ('{"name": "search", "arguments": {"query": "red shoes"}}',
     '{"name": "search", "arguments": {"query": "red shoes"}}'),
    ('Sure! ```json\n{"a": 1}\n``` done', '{"a": 1}'),
    ('The call is {"a": [1, 2]} and more {"b": 2}', '{"a": [1, 2]}'),
    ('bad {start then {"ok": true}', '{"ok": true}'),
])
def test_the_json_scanner_finds_the_first_json_object(text, expected):
    assert next(source for _, source in json_objects(text)) == expected


@pytest.mark.parametrize("text", ["no json here", '{"unclosed": 1', "[1, 2, 3]"])
def test_the_json_scanner_finds_nothing_in_text_without_an_object(text):
    assert list(json_objects(text)) == []


def test_batches_come_longest_prompt_first_and_cover_every_message_once(tiny_llama):
    model, tok = tiny_llama
    batches = list(generate_batches(model, tok, MESSAGES, max_new_tokens=2, batch_size=2))
    rows = [i for batch, _ in batches for i in batch]
    assert sorted(rows) == list(range(len(MESSAGES))) and all(len(b) <= 2 for b, _ in batches)
    lengths = [len(tok(m)["input_ids"]) for m in MESSAGES]
    assert [lengths[i] for i in rows] == sorted(lengths, reverse=True)
    assert [t for _, texts in batches for t in texts] == [generate(model, tok, MESSAGES, max_new_tokens=2,
                                                                   batch_size=2)[i] for i in rows]


SHARED = ("Headlines this author wrote for earlier articles:\n- Debian 13 released with a new installer and "
          "long term support\n- Package maintainers meet in Hamburg to plan the next freeze\n- Why reproducible "
          "builds matter for a distribution\n\nGenerate a headline for the following article: ")
PREFIXED = [SHARED + tail for tail in ("the archive moves to a new mirror network.", "json",
                                       "a security team member explains how embargoed fixes are released to users.",
                                       "steering vectors")]


def test_prefix_groups_keep_a_long_shared_prefix_and_leave_every_row_a_token_of_its_own():
    common = list(range(100))
    encoded = [common + [1000 + i] * (i + 1) for i in range(4)] + [[7, 8, 9], common[:60] + [5]] + [common[:]]
    groups = prefix_groups(encoded)
    assert groups[0] == (99, [0, 1, 2, 3, 6])  # row 6 is the prefix itself: one token stays its own
    assert groups[1] == (0, [4, 5])  # row 5 shares 60 of 99 tokens: generated whole, not cutting the group
    assert sorted(i for _, rows in groups for i in rows) == list(range(len(encoded)))
    head = list(range(500, 540))  # rows that share only a fixed head still compute it once
    assert prefix_groups([head + [1] * 50, head + [2] * 50, head + [3]]) == [(40, [0, 1, 2])]


@pytest.mark.parametrize("response_prefix", ["", "Headline:"])
def test_a_shared_prefix_computed_once_gives_the_greedy_tokens_of_the_whole_prompts(tiny_model, response_prefix):
    model, tok = tiny_model
    messages = PREFIXED + MESSAGES  # rows with the shared prefix and rows without
    whole, shared = {}, {}
    plain = generate(model, tok, messages, max_new_tokens=10, batch_size=3, stats=whole,
                     response_prefix=response_prefix)
    reused = generate(model, tok, messages, max_new_tokens=10, batch_size=3, share_prefix=True, stats=shared,
                      response_prefix=response_prefix)
    assert reused == plain
    assert len(set(plain)) > 1
    if not response_prefix:  # (the tiny llama answers every "Headline:" row alike)
        assert len(set(plain[:len(PREFIXED)])) > 1  # the rows that share a prefix still differ
    assert shared["prompt_tokens"] < whole["prompt_tokens"]


def test_prefix_sharing_is_off_where_a_sliding_window_would_count_the_padding(tiny_llama):
    model, _ = tiny_llama
    assert prefix_sharing_supported(model)
    config = model.config
    try:
        config.layer_types = ["sliding_attention"] + ["full_attention"] * (config.num_hidden_layers - 1)
        assert not prefix_sharing_supported(model)
    finally:
        del config.layer_types
