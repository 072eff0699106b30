"""Decoder-layer discovery: where a model family keeps its layers and its steering sites.

:func:`find_layers` knows the families in :data:`FAMILIES` and takes an explicit
:class:`Layout` (the ``--layers-attr`` flag) for any other; hooks (:mod:`steering.hooks`)
attach to the modules it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
    return Layout(**{name: value for name, value in zip(names, parts, strict=False) if value})


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
