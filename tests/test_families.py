"""Every supported family: a site means the same thing everywhere (fp32, tiny random models).

``attn.L`` / ``mlp.L`` = what layer L's attention / MLP branch adds to the residual stream
(after the branch's output norm in Gemma 2/3 and OLMo 2), ``block.L`` = the layer output.
The references below are hand-written layer forwards, one per layer shape, swapped in for
the model's own ``forward``: they add the vector (or record the value) at that place.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from steering.extract import encode_pair, extract_pairs
from steering.hooks import add_vectors
from steering.inputs import chat_prompt
from steering.layers import find_layers, model_family, parse_layout
from steering.loading import load_model
from tests.conftest import FAMILIES

MESSAGES = ["the quick brown fox", "Generate a headline for the following article: steering vectors",
            "JSON files"]
PAIRS = [{"pair_id": f"p{i}", "user_id": "u", "sample_id": f"s{i}", "prompt": prompt, "chosen": chosen,
          "rejected": rejected} for i, (prompt, chosen, rejected) in enumerate([
              ("Generate a headline for the following article: the quick brown fox", "Fox jumps", "A dog sleeps"),
              ("JSON files", "A library for parsing JSON files and images", "print hello"),
              ("Debian package", "short descriptions", "long descriptions of their software")])]
SANDWICH = {"gemma2", "gemma3", "olmo2", "olmo3"}
ATOL = 1e-5


def _branches(kind: str, layer):
    """(attn branch, attn output norm, mlp branch, mlp output norm) as callables of the residual."""
    ident = lambda x: x  # noqa: E731
    if kind == "gpt2":
        return (lambda x, kw: layer.attn(layer.ln_1(x), **kw)[0], ident,
                lambda x: layer.mlp(layer.ln_2(x)), ident)
    if kind in ("gemma2", "gemma3"):
        return (lambda x, kw: layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0],
                layer.post_attention_layernorm,
                lambda x: layer.mlp(layer.pre_feedforward_layernorm(x)), layer.post_feedforward_layernorm)
    if kind in ("olmo2", "olmo3"):  # no input norms: the branch outputs are normalized instead
        return (lambda x, kw: layer.self_attn(hidden_states=x, **kw)[0], layer.post_attention_layernorm,
                layer.mlp, layer.post_feedforward_layernorm)
    return (lambda x, kw: layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)[0], ident,
            lambda x: layer.mlp(layer.post_attention_layernorm(x)), ident)


def _reference_forward(kind: str, layer, add: dict, record: dict, raw: bool = False):
    """Layer forward that adds ``add[site]`` to that site's residual contribution (``raw``:
    to the branch output before its norm -- the old, wrong place) and records each site."""
    attn, attn_norm, mlp, mlp_norm = _branches(kind, layer)
    zero = 0.0

    def forward(hidden_states, *args, **kwargs):
        if kind == "gpt2":  # GPT2Block(hidden, cache, attention_mask, encoder_hidden_states, ...)
            kwargs.update(zip(("cache", "attention_mask"), args[:2], strict=False))
            kwargs.pop("encoder_attention_mask", None)
        raw_a = attn(hidden_states, kwargs) + (add.get("attn", zero) if raw else zero)
        a = attn_norm(raw_a) + (zero if raw else add.get("attn", zero))
        record["attn"] = a
        h = hidden_states + a
        raw_m = mlp(h) + (add.get("mlp", zero) if raw else zero)
        m = mlp_norm(raw_m) + (zero if raw else add.get("mlp", zero))
        record["mlp"] = m
        out = h + m + add.get("block", zero)
        record["block"] = out
        return out
    return forward


@contextlib.contextmanager
def _patched(model, kind: str, layer: int, add: dict | None = None, record: dict | None = None, raw=False):
    block = find_layers(model)[layer].block
    block.forward = _reference_forward(kind, block, add or {}, {} if record is None else record, raw)
    try:
        yield
    finally:
        del block.forward  # back to the class's forward


def _ids(tok, message):
    return tok([chat_prompt(tok, message)], return_tensors="pt", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_family_is_discovered_with_its_output_norms(tiny_family, kind):
    model, _ = tiny_family(kind)
    layer = find_layers(model)[1]
    attn, attn_norm, mlp, mlp_norm = _branches(kind, layer.block)
    if kind in SANDWICH:
        assert (layer.attn, layer.mlp) == (attn_norm, mlp_norm)
    else:
        assert layer.attn is getattr(layer.block, "attn", getattr(layer.block, "self_attn", None))
        assert layer.mlp is layer.block.mlp
    assert model_family(model).startswith(kind)


@pytest.mark.parametrize("site", ["attn", "mlp", "block"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_injection_equals_a_reference_layer_adding_to_the_residual_contribution(tiny_family, kind, site):
    model, tok = tiny_family(kind)
    ids = _ids(tok, MESSAGES[1])
    v = 3.0 * torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with add_vectors(model, {f"{site}.1": v}):
            hooked = model(input_ids=ids).logits
        with _patched(model, kind, 1, add={site: v}):
            reference = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
        with _patched(model, kind, 1, add={site: v}, raw=True):
            before_norm = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, reference, atol=ATOL, rtol=1e-5)
    assert (hooked - plain).abs().max() > 1e-2, "the vector must change the logits for the test to mean anything"
    if kind in SANDWICH and site != "block":
        # Adding before the branch's output norm is a different intervention: the test can tell.
        assert (hooked - before_norm).abs().max() > 1e-2


@pytest.mark.parametrize("kind", FAMILIES)
def test_extracted_vectors_equal_the_hand_computed_mean_difference(tiny_family, kind):
    model, tok = tiny_family(kind)
    keys = ["attn.0", "mlp.0", "attn.1", "mlp.1", "block.1"]
    got = extract_pairs(model, tok, PAIRS, keys, batch_size=6, progress=False)["diff"]
    rec0, rec1 = {}, {}
    expected = {key: [] for key in keys}
    with torch.no_grad(), _patched(model, kind, 0, record=rec0), _patched(model, kind, 1, record=rec1):
        for pair in PAIRS:
            means = []
            for seq in encode_pair(tok, pair, max_answer_tokens=256):
                model(input_ids=torch.tensor([seq.ids]))  # alone: no padding
                means.append({key: (rec0, rec1)[int(key[-1])][key[:-2]][0, seq.answer_start:].mean(0)
                              for key in keys})
            for key in keys:
                expected[key].append(means[0][key] - means[1][key])
    for key in keys:
        torch.testing.assert_close(got[key], torch.stack(expected[key]), atol=ATOL, rtol=1e-4)


def _batch(tok, messages):
    return tok([chat_prompt(tok, m) for m in messages], return_tensors="pt", padding=True,
               add_special_tokens=False)


def _generate(model, enc, new=5):
    out = model.generate(**enc, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=model.generation_config.pad_token_id)
    return out.sequences[:, enc["input_ids"].shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("kind", FAMILIES)
def test_multiplier_zero_equals_the_plain_model(tiny_family, kind):
    model, tok = tiny_family(kind)
    enc = _batch(tok, MESSAGES)
    zeros = {f"{site}.{layer}": torch.zeros(len(MESSAGES), model.config.hidden_size)
             for site in ("attn", "mlp", "block") for layer in (0, 1)}
    plain_tokens, plain_logits = _generate(model, enc)
    with add_vectors(model, zeros):
        tokens, logits = _generate(model, enc)
    assert torch.equal(tokens, plain_tokens) and torch.equal(logits, plain_logits)


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_mixed_batch_equals_each_row_run_alone(tiny_family, kind):
    model, tok = tiny_family(kind)
    enc = _batch(tok, MESSAGES)
    assert (enc["attention_mask"] == 0).any(), "the batch must contain left padding"
    gen = torch.Generator().manual_seed(2)
    deltas = {k: 3.0 * torch.randn(len(MESSAGES), model.config.hidden_size, generator=gen)
              for k in ("attn.0", "mlp.1", "block.1")}
    with add_vectors(model, deltas, positions="response"):
        tokens, logits = _generate(model, enc)
    assert not torch.equal(tokens, _generate(model, enc)[0]), "steering must change the output"
    for i, message in enumerate(MESSAGES):
        with add_vectors(model, {k: v[i:i + 1] for k, v in deltas.items()}, positions="response"):
            row_tokens, row_logits = _generate(model, _batch(tok, [message]))
        assert torch.equal(tokens[i], row_tokens[0])
        torch.testing.assert_close(logits[i], row_logits[0], atol=1e-4, rtol=1e-4)


def test_an_unknown_post_norm_layout_asks_for_an_explicit_layout(tiny_family):
    model, _ = tiny_family("gemma3")
    wrapper = torch.nn.Module()  # no config: the family table cannot vouch for the layers
    wrapper.model = model.model
    with pytest.raises(ValueError, match="--layers-attr .*attn_norm:mlp_norm"):
        find_layers(wrapper)
    wrapper.fints_layout = parse_layout("model.layers:self_attn:mlp:post_attention_layernorm:"
                                        "post_feedforward_layernorm")  # what --layers-attr sets
    declared = [(layer.attn, layer.mlp) for layer in find_layers(wrapper)]
    assert declared == [(layer.attn, layer.mlp) for layer in find_layers(model)]


def test_layers_attr_names_output_norms_from_the_cli_to_the_hooked_modules(tiny_llama_dir):
    from data_process.config import parse_config
    from stages.extract_vectors import ExtractConfig

    spec = "model.layers:self_attn:mlp:post_attention_layernorm:"
    cfg = parse_config(ExtractConfig, ["--layers-attr", spec])
    model, _ = load_model(tiny_llama_dir, "cpu", "float32", layers_attr=cfg.layers_attr)
    layer = find_layers(model)[1]
    assert layer.attn is model.model.layers[1].post_attention_layernorm and layer.mlp is model.model.layers[1].mlp
    with pytest.raises(ValueError, match="path\\[:attn"):
        parse_layout("a:b:c:d:e:f")
