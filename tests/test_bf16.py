"""The half-precision path (what CUDA runs by default) on CPU: hooks, extraction, generation.

A dtype mistake -- a delta or mask left in fp32 on a bf16 model, a bf16 accumulation in
extraction -- either raises in the next bf16 matmul or shows up against the fp32 model here.
Tolerances: bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through two tiny layers
the extracted pair vectors stay within 5% (relative L2) of fp32 (measured: at most 2.3%),
and steered logits within 0.1 of fp32 (measured: at most 0.032, logits of magnitude ~5).
"""

from __future__ import annotations

import copy

import pytest
import torch

from steering.extract import encode_pair, extract_pairs
from steering.generation import generate
from steering.hooks import add_vectors, record_activations
from steering.inputs import chat_prompt
from steering.loading import load_model
from tests.test_families import MESSAGES, PAIRS

KINDS = ("llama", "gemma3", "gpt2")
KEYS = ["attn.0", "mlp.1", "block.1"]


@pytest.fixture(scope="module")
def pair_of_models(tiny_family):
    """``get(kind)`` -> (fp32 model, bf16 copy, tokenizer)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            model, tok = tiny_family(kind)
            cache[kind] = (model, copy.deepcopy(model).to(torch.bfloat16), tok)
        return cache[kind]
    return get


def _deltas(rows, keys=KEYS, scale=3.0):
    gen = torch.Generator().manual_seed(0)
    return {k: scale * torch.randn(rows, 32, generator=gen) for k in keys}  # fp32, as the stages pass them


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_steered_logits_track_fp32_and_stay_bf16(pair_of_models, kind):
    fp32, bf16, tok = pair_of_models(kind)
    enc = tok([chat_prompt(tok, m) for m in MESSAGES], return_tensors="pt", padding=True, add_special_tokens=False)
    deltas = _deltas(len(MESSAGES))
    with torch.no_grad():
        with add_vectors(fp32, deltas):
            ref = fp32(**enc).logits
        with add_vectors(bf16, deltas), record_activations(bf16, KEYS) as rec:
            got = bf16(**enc).logits
        plain = bf16(**enc).logits
    assert got.dtype == torch.bfloat16 and all(r[0].dtype == torch.bfloat16 for r in rec.values())
    real = enc["attention_mask"].bool()
    assert (got.float() - ref)[real].abs().max() < 0.1
    assert (got.float() - plain.float())[real].abs().max() > 0.5, "the steering must matter at this scale"


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_multiplier_zero_equals_plain_bf16_generation(pair_of_models, kind):
    _, bf16, tok = pair_of_models(kind)
    zeros = {k: torch.zeros(len(MESSAGES), 32) for k in KEYS}
    plain = generate(bf16, tok, MESSAGES, max_new_tokens=6, batch_size=2)
    assert generate(bf16, tok, MESSAGES, max_new_tokens=6, batch_size=2, deltas=zeros) == plain
    steered = generate(bf16, tok, MESSAGES, max_new_tokens=6, batch_size=2, deltas=_deltas(len(MESSAGES)))
    assert steered != plain


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_extraction_is_within_tolerance_of_fp32(pair_of_models, kind):
    fp32, bf16, tok = pair_of_models(kind)
    ref = extract_pairs(fp32, tok, PAIRS, KEYS, batch_size=6, progress=False)["diff"]
    got = extract_pairs(bf16, tok, PAIRS, KEYS, batch_size=6, progress=False)["diff"]
    for key in KEYS:
        assert got[key].dtype == torch.float32
        rel = (got[key] - ref[key]).norm(dim=1) / ref[key].norm(dim=1)
        assert rel.max() < 0.05, f"{kind} {key}: relative error {rel.max():.4f}"


def test_bf16_extraction_accumulates_in_fp32(pair_of_models):
    """The mean over answer tokens is taken in fp32 from the bf16 activations (not in bf16)."""
    _, bf16, tok = pair_of_models("gemma3")
    got = extract_pairs(bf16, tok, PAIRS, KEYS, batch_size=1, progress=False)  # no padding: same shapes
    for i, pair in enumerate(PAIRS):
        for kind, seq in zip(("pos", "neg"), encode_pair(tok, pair, max_answer_tokens=256), strict=True):
            with torch.no_grad(), record_activations(bf16, KEYS) as rec:
                bf16(input_ids=torch.tensor([seq.ids]))
            for key in KEYS:
                expected = rec[key][0][0, seq.answer_start:].float().mean(0)
                torch.testing.assert_close(got[kind][key][i], expected, atol=1e-6, rtol=1e-6)


def test_bf16_load_model_and_steered_generation_through_the_stage_path(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir, device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    zeros = {k: torch.zeros(len(MESSAGES), model.config.hidden_size) for k in ("attn.1", "mlp.1")}
    plain = generate(model, tok, MESSAGES, max_new_tokens=6)
    assert generate(model, tok, MESSAGES, max_new_tokens=6, deltas=zeros, positions="response") == plain


def test_half_precision_on_a_cpu_without_bf16_units_is_warned_about_and_never_on_one_with_them(tmp_path):
    from steering.loading import slow_half_precision_warning

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # no x86 flags: nothing is claimed
    assert "--dtype float32" in slow_half_precision_warning(torch.bfloat16, cpu, old)
    assert "--dtype float32" in slow_half_precision_warning(torch.float16, cpu, old)
    assert slow_half_precision_warning(torch.float32, cpu, old) == ""
    assert slow_half_precision_warning(torch.bfloat16, cpu, amx) == ""
    assert slow_half_precision_warning(torch.bfloat16, cpu, arm) == ""
    assert slow_half_precision_warning(torch.bfloat16, cpu, tmp_path / "missing") == ""
    assert slow_half_precision_warning(torch.bfloat16, cuda, old) == ""
