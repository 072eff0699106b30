"""Model loading, chat formatting and decoder-layer discovery.

Every stage loads models through :func:`load_model` so device, dtype and padding are
set the same way everywhere, and renders prompts through :func:`chat_prompt` so that
extraction sees exactly the text generation will see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Tokenizer set up for batched decoder-only generation: left padding, a pad token."""
    from transformers import AutoTokenizer

    path = _local_dir(path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"  # generated tokens must follow the prompt's last real token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, layers_attr: str = ""):
    """Load a causal LM and its tokenizer from a local directory, in eval mode.

    Returns ``(model, tokenizer)``.  The model is frozen (``requires_grad=False``).
    ``layers_attr`` (``"dotted.path[:attn_attr:mlp_attr]"``) tells :func:`find_layers`
    where the decoder layers of an architecture it does not know are; it is checked here.
    """
    from transformers import AutoModelForCausalLM

    path = _local_dir(path)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev),
                                                 trust_remote_code=trust_remote_code)
    model.to(dev).eval()
    model.requires_grad_(False)
    tok = load_tokenizer(path, trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if layers_attr:
        path_attr, _, rest = layers_attr.partition(":")
        attn_attr, _, mlp_attr = rest.partition(":")
        model.fints_layout = (path_attr, attn_attr or "self_attn", mlp_attr or "mlp")
        find_layers(model)  # a wrong path fails now, naming what it looked for
    return model, tok


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)`` ``[len(rows), longest]``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def model_name(model) -> str:
    """A stable name for a model: its directory name (used in vector metadata)."""
    return Path(str(model.config.name_or_path)).name


def _local_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").exists():
        hint = " Run `bash scripts/setup.sh` to build the default models." if "models" in path.parts else ""
        raise FileNotFoundError(f"model directory {path} has no config.json (models load from local "
                                f"directories only; the hub is offline).{hint}")
    return path


def chat_prompt(tokenizer, message: str, response_prefix: str = "") -> str:
    """Render one user message as the text the model continues.

    Uses the tokenizer's chat template (with the generation prompt) when it has one;
    otherwise a plain ``message\\n`` prompt.  The result includes any BOS the template
    writes, so callers tokenize it with ``add_special_tokens=False``.  ``response_prefix``
    (a task's start of every answer, e.g. ``{"name": "``) opens the assistant turn, so
    generation, pair collection and extraction all continue the same token stream.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                             tokenize=False, add_generation_prompt=True) + response_prefix
    bos = tokenizer.bos_token or ""
    return f"{bos}{message}\n{response_prefix}"


@dataclass
class LayerModules:
    """One decoder layer and the modules whose outputs Fints reads or steers."""

    index: int
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module

    def site(self, name: str) -> nn.Module:
        if name not in ("block", "attn", "mlp"):
            raise ValueError(f"unknown site {name!r}; choose block, attn or mlp")
        return getattr(self, name)


# (path to the layer list, attention attribute, MLP attribute), tried in order.
LAYER_LAYOUTS = [
    ("model.layers", "self_attn", "mlp"),                 # Llama, Mistral, Qwen2/3, Gemma/2/3 text
    ("model.language_model.layers", "self_attn", "mlp"),  # Gemma3 multimodal wrappers
    ("transformer.h", "attn", "mlp"),                     # GPT-2 style
    ("base_model.model.model.layers", "self_attn", "mlp"),  # PEFT-wrapped Llama-style models
]


def _get(obj: object, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def find_layers(model: nn.Module, layers_attr: str | None = None, attn_attr: str = "self_attn",
                mlp_attr: str = "mlp") -> list[LayerModules]:
    """Return the decoder layers of ``model`` with their attention and MLP modules.

    Knows Llama, Mistral, Qwen2, Qwen3, Gemma/Gemma2/Gemma3 and GPT-2 style models.  For
    another architecture pass ``layers_attr`` (dotted path to the ``nn.ModuleList`` of
    decoder layers) and the attribute names of the attention and MLP modules, or load the
    model with ``load_model(..., layers_attr=...)`` (the ``--layers-attr`` flag).
    """
    if layers_attr:
        layouts = [(layers_attr, attn_attr, mlp_attr)]
    elif getattr(model, "fints_layout", None):
        layouts = [model.fints_layout]
    else:
        layouts = LAYER_LAYOUTS
    for path, attn, mlp in layouts:
        try:
            layers = _get(model, path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) and all(
                hasattr(layer, attn) and hasattr(layer, mlp) for layer in layers):
            return [LayerModules(i, layer, getattr(layer, attn), getattr(layer, mlp))
                    for i, layer in enumerate(layers)]
    tried = ", ".join(f"{p} (.{a}, .{m})" for p, a, m in layouts)
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}: looked for {tried}. "
                     "Pass --layers-attr 'dotted.path.to.layers:attn_attr:mlp_attr' naming the layer list "
                     "and the attention and MLP modules of one layer.")


def check_layers(layers: list[LayerModules], wanted: list[int]) -> None:
    """Raise a clear error for layer indices the model does not have."""
    bad = [i for i in wanted if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
