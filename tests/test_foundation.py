"""Foundation: model loading, layer discovery, artifact I/O, manifests and configs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from data_process.artifact_io import JsonlWriter, read_jsonl, sha256_file, write_json
from data_process.config import CommonConfig, parse_config
from data_process.stage import Stage
from steering.inputs import chat_prompt
from steering.layers import find_layers
from steering.loading import load_model

from .conftest import REAL_MODEL


def test_layer_discovery_finds_attention_and_mlp_of_every_layer(tiny_model):
    model, _ = tiny_model
    layers = find_layers(model)
    assert len(layers) == 2
    for i, layer in enumerate(layers):
        assert layer.block is model.model.layers[i]
        assert layer.attn is model.model.layers[i].self_attn
        assert layer.mlp is model.model.layers[i].mlp


def test_layer_discovery_knows_gpt2_style_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    layers = find_layers(model)
    assert [layer.attn for layer in layers] == [model.transformer.h[0].attn, model.transformer.h[1].attn]


def test_layer_discovery_error_says_what_it_looked_for_and_how_to_override():
    with pytest.raises(ValueError, match="layers-attr"):
        find_layers(torch.nn.Linear(2, 2))
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.blocks[0].att = torch.nn.Identity()
    model.blocks[0].ff = torch.nn.Identity()
    assert find_layers(model, layers_attr="blocks", attn_attr="att", mlp_attr="ff")[0].mlp is model.blocks[0].ff
    model.fints_layout = ("blocks", "att", "ff")  # what load_model(..., layers_attr="blocks:att:ff") sets
    assert find_layers(model)[0].attn is model.blocks[0].att


def test_layers_attr_flag_reaches_layer_discovery_and_a_wrong_path_fails_at_load(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, "cpu", "float32", layers_attr="model.layers:self_attn:mlp")
    assert find_layers(model)[1].mlp is model.model.layers[1].mlp
    with pytest.raises(ValueError, match="model.blocks"):
        load_model(tiny_llama_dir, "cpu", "float32", layers_attr="model.blocks")


def test_tokenizer_pads_on_the_left_and_has_a_pad_token(tiny_model):
    _, tok = tiny_model
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_chat_prompt_uses_the_template_or_falls_back_to_plain_text(tiny_llama, tiny_qwen2):
    assert chat_prompt(tiny_llama[1], "hi").endswith("<|im_start|>assistant\n")
    assert chat_prompt(tiny_qwen2[1], "hi") == "<|endoftext|>hi\n"


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "nope")


def test_jsonl_reader_drops_a_torn_final_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert "torn final line" in caplog.text


def test_jsonl_reader_names_file_and_line_of_a_malformed_middle_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: malformed JSON"):
        read_jsonl(path)


def test_jsonl_writer_resumes_after_a_torn_line_without_gaps_or_duplicates(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as w:
        for i in range(3):
            w.write({"i": i})
    with open(path, "a") as f:
        f.write('{"i": 3')  # the crash cut this record
    with JsonlWriter(path) as w:
        done = {r["i"] for r in w.existing}
        for i in range(5):
            if i not in done:
                w.write({"i": i})
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2, 3, 4]


@dataclass
class DemoConfig(CommonConfig):
    SECTIONS = ("select_users",)

    num_users: int = field(default=10, metadata={"help": "users"})
    name: str = field(default="x", metadata={"help": "name"})


def test_manifest_is_written_last_and_records_what_the_stage_did(tmp_path):
    cfg = DemoConfig()
    inp = tmp_path / "in.json"
    write_json(inp, {"k": 1})
    stage = Stage("demo", tmp_path / "s", cfg, inputs=[inp])
    assert not stage.done and not (tmp_path / "s").exists()  # nothing on disk before start()
    out = stage.start() / "out.jsonl"
    out.write_text("{}\n")
    manifest = stage.finish(outputs=[out], model="m", seed=3, n_records=1)
    saved = json.loads((stage.out_dir / "manifest.json").read_text())
    assert saved == json.loads(json.dumps(manifest))
    assert saved["stage"] == "demo" and saved["config"]["num_users"] == 10
    assert saved["inputs"] == [{"path": str(inp), "sha256": sha256_file(inp)}] and saved["seed"] == 3
    assert "torch" in saved["packages"] and saved["n_records"] == 1
    assert Stage("demo", tmp_path / "s", cfg, inputs=[inp]).done
    again = Stage("demo", tmp_path / "s", cfg, overwrite=True)
    assert not again.done and out.exists()  # the previous outputs stay until the redo finishes
    (again.start() / "new.jsonl").write_text("{}\n")
    assert again.out_dir == tmp_path / "s.new" and out.exists()
    again.finish(outputs=[again.out_dir / "new.jsonl"])
    assert not out.exists() and (tmp_path / "s" / "new.jsonl").exists() and not (tmp_path / "s.new").exists()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["outputs"][0]["path"] == str(tmp_path / "s" / "new.jsonl")


def test_config_precedence_is_defaults_then_top_level_then_section_then_flags(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"seed": 7, "run_dir": "r", "select_users": {"num_users": 3, "seed": 9}}))
    cfg = parse_config(DemoConfig, ["--config", str(path)])
    assert (cfg.seed, cfg.run_dir, cfg.num_users, cfg.name) == (9, "r", 3, "x")
    cfg = parse_config(DemoConfig, ["--config", str(path), "--num-users", "5"])
    assert cfg.num_users == 5


def test_unknown_config_keys_are_errors_that_name_them(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"select_users": {"num_user": 3}}))
    with pytest.raises(ValueError, match=r"unknown key 'num_user'.*Did you mean 'num_users'"):
        parse_config(DemoConfig, ["--config", str(path)])
    path.write_text(json.dumps({"sed": 3}))
    with pytest.raises(ValueError, match="unknown top-level key 'sed'"):
        parse_config(DemoConfig, ["--config", str(path)])


@pytest.mark.real_model
def test_real_smollm2_loads_from_models_and_generates():
    model, tok = load_model(REAL_MODEL, device="cpu")
    assert len(find_layers(model)) == 30
    ids = tok(chat_prompt(tok, "Say hello."), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
