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
    ``layers_attr`` (``"path[:attn[:mlp[:attn_norm[:mlp_norm]]]]"``, see :func:`parse_layout`)
    tells :func:`find_layers` where the decoder layers and sites of an architecture it does
    not know are; it is checked here.
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
        model.fints_layout = parse_layout(layers_attr)
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
    """One decoder layer and the modules whose outputs are Fints' steering sites.

    ``attn`` / ``mlp`` are the modules whose output is exactly what the attention / MLP
    branch adds to the residual stream: the branch itself in pre-norm layers, the norm that
    follows it in sandwich / post-norm layers (Gemma 2/3, OLMo 2/3).  ``block`` is the layer.
    """

    index: int
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module

    def site(self, name: str) -> nn.Module:
        if name not in ("block", "attn", "mlp"):
            raise ValueError(f"unknown site {name!r}; choose block, attn or mlp")
        return getattr(self, name)


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its decoder layers and which modules' outputs are the sites.

    ``layers``: dotted path to the ``nn.ModuleList`` of decoder layers ("" = try
    :data:`LAYER_PATHS`).  ``attn`` / ``mlp``: attribute names of one layer's attention and
    MLP modules.  ``attn_norm`` / ``mlp_norm``: the norm a layer applies to that branch's
    output before the residual add, if any ("" = the branch output is added as it is).
    """

    layers: str = ""
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = ""
    mlp_norm: str = ""

    def sites(self) -> tuple[str, str]:
        """Attribute names of the modules hooked for ``attn`` and ``mlp``."""
        return self.attn_norm or self.attn, self.mlp_norm or self.mlp


PRE_NORM = Layout()  # x + attn(norm(x)); then h + mlp(norm(h))
SANDWICH = Layout(attn_norm="post_attention_layernorm", mlp_norm="post_feedforward_layernorm")

# config.model_type (of the text config) -> layout.  Llama-style pre-norm layers also have a
# ``post_attention_layernorm``, but there it is the MLP's INPUT norm: the table, not the
# module names, decides which norms sit on a branch output.
FAMILIES: dict[str, Layout] = {
    "llama": PRE_NORM, "mistral": PRE_NORM, "qwen2": PRE_NORM, "qwen3": PRE_NORM, "gemma": PRE_NORM,
    "gemma2": SANDWICH, "gemma3_text": SANDWICH,   # norm -> branch -> norm -> residual add
    "olmo2": SANDWICH, "olmo3": SANDWICH,          # branch -> norm -> residual add
    "gpt2": Layout(attn="attn"),
}

# Where decoder layers live, tried in order when a layout names no path.
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h",
               "base_model.model.model.layers", "base_model.model.transformer.h")  # last two: PEFT

# Layers of an unknown family whose modules carry these names normalize branch outputs;
# guessing would steer the wrong place, so discovery asks for an explicit layout.
POST_NORM_HINTS = ("post_feedforward_layernorm", "post_ffw_norm", "post_mlp_layernorm")

LAYOUT_HELP = ("Pass --layers-attr 'dotted.path.to.layers:attn:mlp[:attn_norm:mlp_norm]' naming the layer "
               "list, the attention and MLP modules of one layer and, for layers that normalize a branch's "
               "output before the residual add, those norms (e.g. 'model.layers:self_attn:mlp:"
               "post_attention_layernorm:post_feedforward_layernorm').")


def parse_layout(spec: str) -> Layout:
    """``"path[:attn[:mlp[:attn_norm[:mlp_norm]]]]"`` (the ``--layers-attr`` flag) -> :class:`Layout`."""
    parts = spec.split(":")
    if len(parts) > 5 or not parts[0]:
        raise ValueError(f"bad --layers-attr {spec!r}: expected 'path[:attn[:mlp[:attn_norm[:mlp_norm]]]]'")
    names = ("layers", "attn", "mlp", "attn_norm", "mlp_norm")
    return Layout(**{name: value for name, value in zip(names, parts) if value})


def _get(obj: object, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def model_family(model: nn.Module) -> str:
    """``model_type`` of the (text) config, or "" for a module without a config."""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", "") or ""


def _candidates(model: nn.Module, layers_attr: str | None, attn_attr: str, mlp_attr: str,
                attn_norm: str, mlp_norm: str) -> tuple[list[Layout], bool]:
    """Layouts to try, and whether they are trusted (explicit or from :data:`FAMILIES`)."""
    if layers_attr:
        return [Layout(layers_attr, attn_attr, mlp_attr, attn_norm, mlp_norm)], True
    custom = getattr(model, "fints_layout", None)
    if custom:
        return [custom if isinstance(custom, Layout) else Layout(*custom)], True
    family = FAMILIES.get(model_family(model))
    if family is not None:
        return [family], True
    return [PRE_NORM, FAMILIES["gpt2"]], False


def find_layers(model: nn.Module, layers_attr: str | None = None, attn_attr: str = "self_attn",
                mlp_attr: str = "mlp", attn_norm: str = "", mlp_norm: str = "") -> list[LayerModules]:
    """Return the decoder layers of ``model`` with their steering-site modules.

    Knows the families in :data:`FAMILIES` (Llama, Mistral, Qwen2/3, Gemma/Gemma 2/Gemma 3,
    OLMo 2/3, GPT-2).  For another architecture pass ``layers_attr`` (dotted path to the
    ``nn.ModuleList`` of decoder layers), the attention and MLP attribute names and, for
    layers that normalize a branch's output before the residual add, those norms' names --
    or load the model with ``load_model(..., layers_attr=...)`` (the ``--layers-attr`` flag).
    """
    layouts, trusted = _candidates(model, layers_attr, attn_attr, mlp_attr, attn_norm, mlp_norm)
    tried = []
    for layout in layouts:
        attn, mlp = layout.sites()
        for path in [layout.layers] if layout.layers else LAYER_PATHS:
            tried.append(f"{path} (.{attn}, .{mlp})")
            try:
                layers = _get(model, path)
            except AttributeError:
                continue
            if not (isinstance(layers, nn.ModuleList) and len(layers) and all(
                    hasattr(layer, attn) and hasattr(layer, mlp) for layer in layers)):
                continue
            hints = [h for h in POST_NORM_HINTS if hasattr(layers[0], h)]
            if hints and not trusted:
                raise ValueError(f"{type(model).__name__} ({model_family(model) or 'no model_type'}) is not a "
                                 f"known family and its layers have {hints}: they likely normalize branch "
                                 f"outputs before the residual add, so the sites are ambiguous. {LAYOUT_HELP}")
            return [LayerModules(i, layer, getattr(layer, attn), getattr(layer, mlp))
                    for i, layer in enumerate(layers)]
    raise ValueError(f"cannot find decoder layers in {type(model).__name__}: looked for {', '.join(tried)}. "
                     + LAYOUT_HELP)


def check_layers(layers: list[LayerModules], wanted: list[int]) -> None:
    """Raise a clear error for layer indices the model does not have."""
    bad = [i for i in wanted if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
