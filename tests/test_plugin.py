"""--plugin: per-user PEFT LoRA adapters under steering, on the tiny Llama."""

from __future__ import annotations

import pytest
import torch

from data_process.artifact_io import JsonlWriter, read_jsonl
from steering.algorithms import AlgoSettings, Prepared, ZeroShot
from steering.layers import find_layers
from steering.loading import load_model
from steering.runner import UserAdapters, find_adapters, generate_records
from tasks import get_task

peft = pytest.importorskip("peft")
LORA_STD = 0.1  # large enough to flip greedy tokens, small enough that steering still shows through

SAMPLES = [{"id": f"{u}-{i}", "user_id": u, "input": text, "output": "gold", "history": []}
           for u in ("u_lora", "u_zero", "u_none")
           for i, text in enumerate(["the quick brown fox jumps", "a library for parsing JSON files"])]


class FixedSteer(ZeroShot):
    """Zero-shot prompts (abstract task: the whole text is kept) plus the same delta on every
    row (scale 0 = no steering; the tiny model's activations are ~0.01, hence small scales)."""

    def __init__(self, settings: AlgoSettings, hidden: int, scale: float):
        super().__init__(settings)
        torch.manual_seed(1)
        self.delta, self.scale = torch.randn(hidden), scale

    def __call__(self, samples: list[dict]) -> Prepared:
        prepared = super().__call__(samples)
        rows = self.delta.expand(len(samples), -1) * self.scale
        prepared.deltas = {"attn.1": rows.clone(), "mlp.1": rows.clone()}
        return prepared


def make_adapter(model_dir, out, nonzero: bool):
    """Save a rank-2 LoRA adapter for q/v projections; LoRA's B starts at zero."""
    base, _ = load_model(model_dir, device="cpu", dtype="float32")
    torch.manual_seed(0)  # LoRA's A is drawn from the global RNG: fix it so the test is order-independent
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(base, config)
    if nonzero:
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, LORA_STD)
    wrapped.save_pretrained(out)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("plugin")
    make_adapter(tiny_llama_dir, root / "u_lora", nonzero=True)
    make_adapter(tiny_llama_dir, root / "u_zero", nonzero=False)
    return root  # u_none has no adapter: it runs the base model


def run(tmp_path, model_dir, plugin, scale: float, name: str) -> dict[str, str]:
    model, tok = load_model(model_dir, device="cpu", dtype="float32")
    algo = FixedSteer(AlgoSettings(task=get_task("longlamp"), tokenizer=tok), model.config.hidden_size, scale)
    adapters = UserAdapters(model, find_adapters(plugin, [s["user_id"] for s in SAMPLES])) if plugin else None
    with JsonlWriter(tmp_path / name / "generations.jsonl") as writer:
        generate_records(model, tok, algo, SAMPLES, writer, task=get_task("longlamp"), algo_name="fints", batch_size=4,
                         gen_kwargs={"max_new_tokens": 8}, adapters=adapters)
    if adapters:
        adapters.close()
    return {r["id"]: r["generation"] for r in read_jsonl(tmp_path / name / "generations.jsonl")}


def by_user(outputs: dict[str, str], user: str) -> list[str]:
    return [text for i, text in sorted(outputs.items()) if i.startswith(user)]


def test_only_a_non_zero_adapter_changes_the_outputs(tmp_path, tiny_llama_dir, plugin_dir):
    base = run(tmp_path, tiny_llama_dir, None, 0.0, "base")
    lora = run(tmp_path, tiny_llama_dir, plugin_dir, 0.0, "lora")
    assert by_user(lora, "u_lora") != by_user(base, "u_lora")
    assert by_user(lora, "u_zero") == by_user(base, "u_zero")
    assert by_user(lora, "u_none") == by_user(base, "u_none")


def test_steering_still_applies_on_top_of_the_adapter(tmp_path, tiny_llama_dir, plugin_dir):
    lora = run(tmp_path, tiny_llama_dir, plugin_dir, 0.0, "lora")
    steered = run(tmp_path, tiny_llama_dir, plugin_dir, 0.01, "steered")
    steered_base = run(tmp_path, tiny_llama_dir, None, 0.01, "steered_base")
    assert by_user(steered, "u_lora") != by_user(lora, "u_lora")
    assert by_user(steered, "u_lora") != by_user(steered_base, "u_lora")  # adapter and vector both act
    assert by_user(steered, "u_zero") == by_user(steered_base, "u_zero")


def test_layers_are_found_in_a_peft_wrapped_model_and_unload_restores_the_base(tiny_llama_dir, plugin_dir):
    model, _ = load_model(tiny_llama_dir, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 12]])
    before = model(ids).logits
    adapters = UserAdapters(model, find_adapters(plugin_dir, ["u_lora"]))
    wrapped_layers = find_layers(adapters.model)
    assert len(wrapped_layers) == 2
    assert wrapped_layers[1].attn is find_layers(adapters.model.get_base_model())[1].attn
    with adapters.active("u_lora"):
        assert not torch.allclose(adapters.model(ids).logits, before)
    adapters.close()
    assert torch.equal(model(ids).logits, before)


def test_a_plugin_dir_without_adapters_for_these_users_is_an_error(tmp_path, plugin_dir):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        find_adapters(plugin_dir, ["somebody_else"])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        find_adapters(tmp_path / "missing", ["u_lora"])
    with pytest.raises(ValueError, match="cannot name a folder"):
        find_adapters(plugin_dir, ["../u_lora"])


def test_the_adapter_files_are_each_user_s_config_and_weights(plugin_dir):
    found = find_adapters(plugin_dir, ["u_lora", "u_none"])
    assert (found.users, found.missing) == (["u_lora"], ["u_none"])
    assert [f.name for f in found.files()] == ["adapter_config.json", "adapter_model.safetensors"]
