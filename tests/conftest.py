"""Shared fixtures: tiny random models with a tokenizer trained here, fully offline.

``tiny_llama`` has a ChatML chat template; ``tiny_qwen2`` has none (exercises the
plain-prompt fallback).  Both are saved to disk and loaded back with
``from_pretrained``, the same code path the stages use.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from data_process.artifact_io import read_json, sha256_file, write_json

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The tiny models are far faster single-threaded, and CI machines are shared: two
# threads contending with other processes made a 1 ms forward take 0.5 s.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "debian"
REAL_MODEL = ROOT / "models" / "smollm2-135m-instruct"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CORPUS = [
    "Generate a headline for the following article: the quick brown fox jumps over the lazy dog.",
    "Generate an abstract for the title \"steering vectors\". We study personalization of language models.",
    "A library for parsing JSON files and a tool to convert images between formats.",
    "Debian package maintainers write short descriptions and long descriptions of their software.",
    "search_product_by_query get_recommendations_by_history add_product_review arguments name query",
    "{\"name\": \"search\", \"arguments\": {\"query\": \"red shoes\"}} print(\"hello\") Headline: news",
    "0123456789 user history item review rating title category product",
] * 20


def _train_tokenizer(path: Path, chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return fast


def _build(path: Path, kind: str, chat_template: str | None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = _train_tokenizer(path, chat_template)
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    # Random init gives near-uniform logits; scaling the head makes greedy choices
    # decisive so that token-level comparisons are meaningful.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    return path


# One tiny random model per supported family (2 layers, hidden 32).  Sliding windows are
# wider than any test sequence so that a left-padded row sees the same tokens as the row
# alone (a window counts padded positions).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "olmo2", "olmo3", "gpt2")


def family_model(kind: str, tok):
    """A tiny random ``kind`` causal LM for ``tok``, with non-trivial norm weights (fp32, eval)."""
    import transformers as tf

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gemma = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=512)
    builders = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=8)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=512)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, **gemma)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, **gemma)),
        "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**common)),
        "olmo3": lambda: tf.Olmo3ForCausalLM(tf.Olmo3Config(**common, sliding_window=512)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)),
    }
    torch.manual_seed(0)
    model = builders[kind]()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:  # random init leaves norms at identity
                param.add_(0.5 * torch.randn_like(param))
        model.lm_head.weight.mul_(8.0)  # decisive greedy choices (see _build)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def family_tokenizer(tmp_path_factory):
    tok = _train_tokenizer(tmp_path_factory.mktemp("family_tok"), CHATML)
    tok.padding_side = "left"  # as load_tokenizer sets it
    return tok


@pytest.fixture(scope="session")
def tiny_family(family_tokenizer):
    """``tiny_family(kind)`` -> ``(model, tokenizer)``, built once per session and kind."""
    cache: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = (family_model(kind, family_tokenizer), family_tokenizer)
        return cache[kind]
    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tiny_llama"), "llama", CHATML)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", None)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from steering.loading import load_model

    return load_model(tiny_llama_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_qwen2_dir):
    from steering.loading import load_model

    return load_model(tiny_qwen2_dir, device="cpu", dtype="float32")


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request):
    """Both tiny models, one after the other: ``(model, tokenizer)``."""
    return request.getfixturevalue(f"tiny_{request.param}")


def fixture_generator(folder: str):
    """The fixture-writing script ``tests/fixtures/<folder>/make_fixture.py``, imported as a module."""
    spec = importlib.util.spec_from_file_location(f"make_{folder}", FIXTURES / folder / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs_real_model():
    return pytest.mark.skipif(not (REAL_MODEL / "config.json").exists(),
                              reason="models/ not built (run scripts/setup.sh)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="models/ not built (run scripts/setup.sh)")
    for item in items:
        if "real_model" in item.keywords and not (REAL_MODEL / "config.json").exists():
            item.add_marker(skip)


def run_stage(module: str, argv: list[str], **kwargs):
    """Run ``stages.<module>`` as its script would, but let errors raise: parse, then run."""
    import dataclasses

    from data_process.config import parse_config

    mod = importlib.import_module(f"stages.{module}")
    (config_cls,) = [v for v in vars(mod).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
                     and v.__module__ == mod.__name__]
    return mod.run(parse_config(config_cls, argv), **kwargs)


def as_if_written_by_its_stage(path: Path) -> None:
    """Record an edited finished file's sha256 in its stage's manifest, so that reading it is
    not refused as changed and the check under test is reached."""
    manifest = read_json(path.parent / "manifest.json")
    for output in manifest["outputs"]:
        if Path(output["path"]).name == path.name:
            output["sha256"] = sha256_file(path)
    write_json(path.parent / "manifest.json", manifest)
