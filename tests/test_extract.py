"""Extraction: per-pair vectors equal a hand-computed mean difference over answer tokens."""

from __future__ import annotations

import json

import pytest
import torch

from steering.extract import answer_means, check_finite, encode_pair, extract_chunked, extract_pairs
from steering.hooks import record_activations
from steering.inputs import chat_prompt
from steering.vectors import VectorStore, load_user_vectors
from tests.conftest import run_stage

PAIRS = [
    {"pair_id": "p0", "user_id": "u1", "sample_id": "s0",
     "prompt": "Generate a headline for the following article: the quick brown fox",
     "chosen": "fox jumps over dog", "rejected": "a lazy dog"},
    {"pair_id": "p1", "user_id": "u1", "sample_id": "s1", "prompt": "JSON files",
     "chosen": "A library for parsing JSON files and a tool to convert images", "rejected": "images"},
    {"pair_id": "p2", "user_id": "u2", "sample_id": "s2",
     "prompt": "Debian package maintainers write short descriptions",
     "chosen": "short descriptions", "rejected": "long descriptions of their software, the quick brown fox"},
    {"pair_id": "p3", "user_id": "u2", "sample_id": "s3", "prompt": "user history item review rating",
     "chosen": "rating title category product", "rejected": "review"},
    {"pair_id": "p4", "user_id": "u3", "sample_id": "s4", "prompt": "steering vectors",
     "chosen": "We study personalization of language models.", "rejected": "Headline: news"},
]
KEYS = ["attn.0", "mlp.0", "block.0", "block.1", "mlp.1"]


def _hand_mean(model, tok, prompt, answer, key):
    """Mean over the answer tokens of one unpadded sequence, computed outside the extractor."""
    ctx = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    ans = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + ans])
    site, layer = key.split(".")
    with torch.no_grad(), record_activations(model, [f"attn.{layer}", f"mlp.{layer}"]) as rec:
        hidden_in = model(input_ids=ids, output_hidden_states=True).hidden_states[int(layer)]
    if site == "block":
        # A decoder layer's output is its input plus the attention and MLP outputs; the input
        # comes from output_hidden_states, independent of the block hook.
        out = hidden_in + rec[f"attn.{layer}"][0] + rec[f"mlp.{layer}"][0]
    else:
        out = rec[key][0]
    return out[0, len(ctx):].double().mean(0)


def test_extracted_vector_equals_the_hand_computed_mean_difference_over_answer_tokens(tiny_model):
    model, tok = tiny_model
    acts = extract_pairs(model, tok, PAIRS, KEYS, batch_size=4, progress=False)
    for key in KEYS:
        for i, pair in enumerate(PAIRS):
            expected = _hand_mean(model, tok, pair["prompt"], pair["chosen"], key) - \
                _hand_mean(model, tok, pair["prompt"], pair["rejected"], key)
            torch.testing.assert_close(acts["diff"][key][i].double(), expected, atol=2e-5, rtol=1e-4)
            assert acts["diff"][key].dtype == torch.float32


def test_batched_extraction_equals_one_pair_at_a_time(tiny_model):
    model, tok = tiny_model
    batched = extract_pairs(model, tok, PAIRS, KEYS, batch_size=10, progress=False)
    for i, pair in enumerate(PAIRS):
        alone = extract_pairs(model, tok, [pair], KEYS, batch_size=1, progress=False)
        for kind in ("diff", "pos", "neg"):
            for key in KEYS:
                torch.testing.assert_close(batched[kind][key][i], alone[kind][key][0], atol=2e-5, rtol=1e-4)


def test_the_answer_boundary_is_exact_in_token_space(tiny_llama):
    _, tok = tiny_llama
    chosen, rejected = encode_pair(tok, PAIRS[0], max_answer_tokens=100)
    ctx = tok(chat_prompt(tok, PAIRS[0]["prompt"]), add_special_tokens=False)["input_ids"]
    assert chosen.ids[:chosen.answer_start] == ctx == rejected.ids[:rejected.answer_start]
    assert chosen.ids[chosen.answer_start:] == tok(PAIRS[0]["chosen"], add_special_tokens=False)["input_ids"]
    cut, _ = encode_pair(tok, PAIRS[1], max_answer_tokens=2)
    assert len(cut.ids) - cut.answer_start == 2


def test_prompt_and_padding_tokens_do_not_enter_the_mean(tiny_llama):
    model, tok = tiny_llama
    from steering.extract import Sequence
    # Same answer tokens after two different contexts: only the answers' own activations
    # count, and a short row padded next to a long one must equal itself alone.
    short = Sequence([5, 6, 7, 8], 2)
    long = Sequence(list(range(10, 40)) + [7, 8], 30)
    both = answer_means(model, [short, long], ["block.0"], tok.pad_token_id, batch_size=2, progress=False)
    alone = answer_means(model, [short], ["block.0"], tok.pad_token_id, batch_size=1, progress=False)
    torch.testing.assert_close(both["block.0"][0], alone["block.0"][0], atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # hidden_states[1] = layer 0's output
        hidden = model(input_ids=torch.tensor([short.ids]), output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(alone["block.0"][0], hidden[0, 2:].mean(0), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(alone["block.0"][0], hidden[0].mean(0), atol=1e-3)


def test_an_empty_answer_or_a_non_finite_vector_is_an_error_naming_the_pair(tiny_llama):
    _, tok = tiny_llama
    with pytest.raises(ValueError, match="p9.*'chosen'"):
        encode_pair(tok, {**PAIRS[0], "pair_id": "p9", "chosen": ""}, 10)
    vectors = torch.zeros(3, 4)
    vectors[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\['p1'\]"):
        check_finite(vectors, PAIRS, "attn.0")


def test_chunked_extraction_resumes_from_finished_chunks(tiny_llama, tmp_path):
    model, tok = tiny_llama
    settings = {"model": "tiny"}
    first = extract_chunked(model, tok, PAIRS, KEYS, tmp_path, settings, chunk_pairs=2, batch_size=4)
    chunks = sorted(tmp_path.glob("chunk_*.safetensors"))
    assert len(chunks) == 3
    stamps = {c: c.stat().st_mtime_ns for c in chunks}
    chunks[1].unlink()  # as if the run died before this chunk was saved
    with record_activations(model, ["block.0"]) as rec:
        second = extract_chunked(model, tok, PAIRS, KEYS, tmp_path, settings, chunk_pairs=2, batch_size=4)
    assert len(rec["block.0"]) == 1  # only the missing chunk ran (2 pairs = 4 sequences = one batch)
    assert all(c.stat().st_mtime_ns == stamps[c] for c in (chunks[0], chunks[2]))
    for key in KEYS:
        torch.testing.assert_close(first["diff"][key], second["diff"][key])
    with record_activations(model, ["block.0"]) as rec:
        extract_chunked(model, tok, PAIRS, KEYS, tmp_path, {"model": "other"}, chunk_pairs=2, batch_size=4)
    assert len(rec["block.0"]) == 3  # a changed fingerprint recomputes every chunk


def test_stage_04_writes_vectors_index_and_user_vectors(tiny_qwen2_dir, tiny_qwen2, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "pairs").mkdir(parents=True)
    (run_dir / "pairs" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    run_stage("extract_vectors", ["--run-dir", str(run_dir), "--model", str(tiny_qwen2_dir), "--device", "cpu",
                 "--dtype", "float32", "--layers", "0", "1", "--sites", "attn", "mlp", "--chunk-pairs", "2"])
    out = run_dir / "vectors"
    assert (out / "manifest.json").exists() and not (out / "chunks").exists()
    model, _ = tiny_qwen2
    store = VectorStore.load(out, model=model)
    assert [r["pair_id"] for r in store.index] == [p["pair_id"] for p in PAIRS]
    assert sorted(store.keys) == ["attn.0", "attn.1", "mlp.0", "mlp.1"]
    assert store.meta["dtype"] == "float16" and store.get("mlp.1").shape == (5, 32)
    expected = extract_pairs(model, *_tok(tiny_qwen2), PAIRS, ["mlp.1"], progress=False)["diff"]["mlp.1"]
    torch.testing.assert_close(store.get("mlp.1"), expected.half().float())
    users = load_user_vectors(out, "mean", ["mlp.1"], model=model)
    assert sorted(users) == ["u1", "u2", "u3"]
    torch.testing.assert_close(users["u1"]["mlp.1"], expected[:2].mean(0).half().float())
    for strategy in ("pca", "logistic"):
        assert load_user_vectors(out, strategy, ["attn.0"])["u3"]["attn.0"].shape == (32,)


def _tok(model_and_tok):
    return (model_and_tok[1],)
