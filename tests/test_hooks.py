"""Steering hooks: exactness properties on the tiny Llama and Qwen2 models (fp32)."""

from __future__ import annotations

import pytest
import torch

from steering.hooks import StopForward, add_vectors, record_activations, stop_after_layer
from steering.inputs import chat_prompt
from steering.layers import find_layers

MESSAGES = ["the quick brown fox", "Generate a headline for the following article: steering vectors",
            "JSON files"]
ATOL = 1e-4


def _batch(tok, messages):
    texts = [chat_prompt(tok, m) for m in messages]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _deltas(model, keys, rows, scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(rows, model.config.hidden_size, generator=gen) for k in keys}


def _generate(model, enc, new=5):
    out = model.generate(**enc, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=model.generation_config.pad_token_id)
    prompt = enc["input_ids"].shape[1]
    return out.sequences[:, prompt:], torch.stack(out.logits, 1)


def _hooks_of(model):
    """Every forward (pre-)hook on the model's modules (the session fixture may carry
    hooks of other libraries: the property is that ours leave none behind)."""
    return {(name, kind, handle) for name, m in model.named_modules()
            for kind, hooks in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks)) for handle in hooks}


def _position_ids(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def test_multiplier_zero_gives_logits_identical_to_the_unhooked_model(tiny_model):
    model, tok = tiny_model
    enc = _batch(tok, MESSAGES)
    plain = model(**enc).logits
    zeros = {k: torch.zeros(3, model.config.hidden_size) for k in ("attn.0", "mlp.0", "block.1", "mlp.1")}
    with add_vectors(model, zeros):
        steered = model(**enc).logits
    assert torch.equal(plain, steered)


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_a_mixed_left_padded_batch_equals_each_row_run_alone(tiny_model, positions):
    model, tok = tiny_model
    enc = _batch(tok, MESSAGES)
    assert (enc["attention_mask"] == 0).any(), "the batch must contain left padding"
    deltas = _deltas(model, ["attn.0", "mlp.0", "block.1"], len(MESSAGES))
    with add_vectors(model, deltas, positions=positions):
        tokens, logits = _generate(model, enc)
    plain_tokens, _ = _generate(model, enc)
    assert not torch.equal(tokens, plain_tokens), "steering must change the output for the test to mean anything"
    for i, message in enumerate(MESSAGES):
        alone = _batch(tok, [message])
        row = {k: v[i:i + 1] for k, v in deltas.items()}
        with add_vectors(model, row, positions=positions):
            row_tokens, row_logits = _generate(model, alone)
        assert torch.equal(tokens[i], row_tokens[0])
        torch.testing.assert_close(logits[i], row_logits[0], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_kv_cached_generation_equals_uncached_step_by_step_forward(tiny_model, positions):
    model, tok = tiny_model
    enc = _batch(tok, MESSAGES)
    prompt_length = enc["input_ids"].shape[1]
    deltas = _deltas(model, ["attn.1", "mlp.0", "block.0"], len(MESSAGES), seed=1)
    with add_vectors(model, deltas, positions=positions):
        cached_tokens, cached_logits = _generate(model, enc, new=6)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    steps = []
    for _ in range(6):
        with add_vectors(model, deltas, positions=positions, prompt_length=prompt_length):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask),
                           use_cache=False).logits[:, -1]
        steps.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(cached_tokens, ids[:, prompt_length:])
    torch.testing.assert_close(cached_logits, torch.stack(steps, 1), atol=ATOL, rtol=1e-4)


def _reference_logits(model, ids, layer, v_attn, v_mlp):
    """A hand-written forward: layer ``layer`` adds v_attn to its attention output and
    v_mlp to the MLP output computed on the shifted residual."""
    base = model.model
    h = base.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    pe = base.rotary_emb(h, position_ids=position_ids)
    for i, block in enumerate(base.layers):
        if i != layer:
            h = block(h, attention_mask=None, position_ids=position_ids, position_embeddings=pe)
            continue
        attn_out, _ = block.self_attn(block.input_layernorm(h), position_embeddings=pe, attention_mask=None)
        h = h + attn_out + v_attn                      # pulse: the MLP sees the shifted residual
        h = h + block.mlp(block.post_attention_layernorm(h)) + v_mlp  # re-pulse
    return model.lm_head(base.norm(h))


@pytest.mark.parametrize("layer", [0, 1])
def test_attn_and_mlp_hooks_equal_a_hand_written_reference_layer(tiny_model, layer):
    model, tok = tiny_model
    ids = _batch(tok, [MESSAGES[1]])["input_ids"]
    deltas = _deltas(model, [f"attn.{layer}", f"mlp.{layer}"], 1, seed=2)
    with torch.no_grad():
        with add_vectors(model, deltas):
            hooked = model(input_ids=ids).logits
        reference = _reference_logits(model, ids, layer, deltas[f"attn.{layer}"], deltas[f"mlp.{layer}"])
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(hooked, reference, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(hooked, plain, atol=1e-2)


def _full_forward(model, ids, mask, deltas=None, **kw):
    if deltas is None:
        return model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask)).logits
    with add_vectors(model, deltas, **kw):
        return model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask)).logits


@pytest.mark.parametrize("key", ["block.1", "attn.0"])
def test_response_positions_leave_prompt_logits_untouched_and_change_generated_ones(tiny_model, key):
    model, tok = tiny_model
    enc = _batch(tok, MESSAGES)
    prompt_length = enc["input_ids"].shape[1]
    tokens, _ = _generate(model, enc, new=4)
    ids = torch.cat([enc["input_ids"], tokens], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(tokens)], 1)
    plain = _full_forward(model, ids, mask)
    deltas = _deltas(model, [key], len(MESSAGES), scale=4.0)
    steered = _full_forward(model, ids, mask, deltas, positions="response", prompt_length=prompt_length)
    real = enc["attention_mask"].bool()
    assert torch.equal(steered[:, :prompt_length][real], plain[:, :prompt_length][real])
    assert (steered[:, prompt_length:] - plain[:, prompt_length:]).abs().amax(-1).gt(1e-3).all()


def test_prompt_positions_change_prompt_logits_and_do_not_steer_generated_tokens(tiny_model):
    model, tok = tiny_model
    enc = _batch(tok, MESSAGES)
    prompt_length = enc["input_ids"].shape[1]
    tokens, _ = _generate(model, enc, new=4)
    ids = torch.cat([enc["input_ids"], tokens], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(tokens)], 1)
    plain = _full_forward(model, ids, mask)
    # On the last block a position's logits depend on its own output only, so an unsteered
    # generated position must keep its plain logits exactly.
    deltas = _deltas(model, ["block.1"], len(MESSAGES), scale=4.0)
    steered = _full_forward(model, ids, mask, deltas, positions="prompt", prompt_length=prompt_length)
    real = enc["attention_mask"].bool()
    assert torch.equal(steered[:, prompt_length:], plain[:, prompt_length:])
    assert (steered[:, :prompt_length][real] - plain[:, :prompt_length][real]).abs().amax(-1).gt(1e-3).all()


def test_left_padding_is_never_steered(tiny_model):
    model, tok = tiny_model
    enc = _batch(tok, MESSAGES)
    deltas = _deltas(model, ["block.1"], len(MESSAGES))
    with record_activations(model, ["block.1"]) as plain:
        model(**enc)
    with add_vectors(model, deltas), record_activations(model, ["block.1"]) as steered:
        model(**enc)  # the read hook is registered after the steering hook: it sees the steered output
    pad = enc["attention_mask"] == 0
    assert torch.equal(steered["block.1"][0][pad], plain["block.1"][0][pad])
    diff = steered["block.1"][0] - plain["block.1"][0]
    torch.testing.assert_close(diff[~pad], deltas["block.1"].unsqueeze(1).expand_as(diff)[~pad])


def test_hooks_are_gone_after_the_context_exits_and_after_an_exception(tiny_llama):
    model, tok = tiny_llama
    enc = _batch(tok, MESSAGES)
    plain = model(**enc).logits
    before = _hooks_of(model)
    deltas = _deltas(model, ["attn.0", "mlp.1", "block.0"], len(MESSAGES))
    with add_vectors(model, deltas), record_activations(model, ["mlp.0"]):
        assert len(_hooks_of(model) - before) == 6  # 3 sites + pre/post on the model + 1 read hook
        model(**enc)
    assert _hooks_of(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with add_vectors(model, deltas), record_activations(model, ["mlp.0"]), stop_after_layer(model, 0):
            raise RuntimeError("boom")
    assert _hooks_of(model) == before
    with pytest.raises(ValueError, match="3 rows but the deltas have 2"):  # raised inside a forward
        with add_vectors(model, _deltas(model, ["attn.0"], 2)):
            model(**enc)
    assert _hooks_of(model) == before
    assert torch.equal(model(**enc).logits, plain)


def test_read_hooks_record_outputs_without_changing_them(tiny_qwen2):
    model, tok = tiny_qwen2
    enc = _batch(tok, MESSAGES)
    out = model(**enc, output_hidden_states=True)
    with record_activations(model, ["block.0", "attn.1"]) as rec:
        again = model(**enc).logits
    assert torch.equal(again, out.logits)
    assert torch.equal(rec["block.0"][0], out.hidden_states[1])
    assert rec["attn.1"][0].shape == (3, enc["input_ids"].shape[1], model.config.hidden_size)


def test_stop_after_layer_ends_the_forward_after_recording(tiny_llama):
    model, tok = tiny_llama
    enc = _batch(tok, MESSAGES)
    with record_activations(model, ["mlp.0", "block.1"]) as rec, stop_after_layer(model, 0):
        with pytest.raises(StopForward):
            model(**enc)
    assert len(rec["mlp.0"]) == 1 and rec["block.1"] == []


def test_wrong_batch_size_and_bad_keys_are_clear_errors(tiny_llama):
    model, tok = tiny_llama
    enc = _batch(tok, MESSAGES)
    with pytest.raises(ValueError, match="3 rows but the deltas have 2"):
        with add_vectors(model, _deltas(model, ["attn.0"], 2)):
            model(**enc)
    with pytest.raises(ValueError, match="site"):
        with add_vectors(model, _deltas(model, ["resid.0"], 3)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with add_vectors(model, _deltas(model, ["attn.7"], 3)):
            pass
    with pytest.raises(ValueError, match="positions"):
        with add_vectors(model, _deltas(model, ["attn.0"], 3), positions="middle"):
            pass
    assert len(find_layers(model)) == 2
