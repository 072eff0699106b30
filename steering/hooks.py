"""Every forward hook in Fints: steering (additive) hooks and activation read hooks.

This is the only module that calls ``register_forward_hook`` /
``register_forward_pre_hook``; each context manager removes its handles in ``finally``,
so a model never keeps a hook after the ``with`` block, even when the block raises.

Site keys are ``"<site>.<layer>"`` with site ``attn`` (what the attention branch adds to
the residual stream), ``mlp`` (what the MLP branch adds) or ``block`` (decoder layer
output) -- on every family: where a layer normalizes a branch's output before the
residual add (Gemma 2/3, OLMo 2), the site is that norm's output (see
:data:`steering.layers.FAMILIES`).  Injection and reading use the same modules.

How positions are known.  A site hook only sees its module's output ``[batch, T, hidden]``.
A pre-hook on the model passed to :func:`add_vectors` reads, for every forward call, the
2-D ``attention_mask`` (over past + current tokens) and the cache length, so the current
tokens' absolute indices in the left-padded sequence are ``past .. past + T - 1``.  From
them it builds one steering mask ``[batch, T, 1]`` per call (or none, when every current
token is steered), shared by all site hooks of that call.  A generated token therefore
gets the same treatment whether it is produced through a KV cache (T == 1) or inside a
full uncached forward, and padding (mask 0) is never steered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from steering.layers import LayerModules, find_layers

SITES = ("attn", "mlp", "block")
# Which tokens get a steering vector; the one definition (generation and the stages import it).
POSITIONS = ("all", "prompt", "response")


class StopForward(Exception):
    """Raised by :func:`stop_after_layer` to end a forward pass early."""


def parse_key(key: str) -> tuple[str, int]:
    """``"attn.15"`` -> ``("attn", 15)``, with a clear error for malformed keys."""
    site, _, layer = key.partition(".")
    if site not in SITES or not layer.isdigit():
        raise ValueError(f"bad steering key {key!r}: expected '<site>.<layer>' with site in {SITES}, e.g. 'attn.15'")
    return site, int(layer)


def resolve_modules(model: nn.Module, keys: list[str]) -> dict[str, nn.Module]:
    """Map site keys to the modules whose outputs they name."""
    layers: list[LayerModules] = find_layers(model)
    modules = {}
    for key in keys:
        site, layer = parse_key(key)
        if layer >= len(layers):
            raise ValueError(f"key {key!r}: layer {layer} out of range, the model has {len(layers)} layers")
        modules[key] = layers[layer].site(site)
    return modules


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (text config of multimodal wrappers included)."""
    return model.config.get_text_config().hidden_size


def _output_tensor(output):
    """The hidden-state tensor of a module output (Tensor, or first element of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output, tensor: torch.Tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _CallState:
    """What the pre-hook learned about the current forward call."""

    active: bool = False          # inside a forward of the hooked model
    steer: bool = True            # False when no current token is steered
    mask: torch.Tensor | None = None  # [batch, T, 1] in model dtype; None = all steered
    batch: int = 0


def _call_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None, object]:
    """(input_ids or inputs_embeds, attention_mask, cache) of a causal-LM forward call."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is None:
        raise ValueError("add_vectors: the forward call has neither input_ids nor inputs_embeds")
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return ids, mask, cache


class _Positions:
    """Builds the per-call steering mask from absolute positions (see module docstring)."""

    def __init__(self, positions: str, prompt_length: int | None, dtype: torch.dtype):
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose one of {POSITIONS}")
        if prompt_length is not None and prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        self.positions = positions
        self.prompt_length = prompt_length
        self.dtype = dtype
        self.state = _CallState()

    def pre_hook(self, module, args, kwargs) -> None:
        ids, attn_mask, cache = _call_inputs(args, kwargs)
        batch, length = ids.shape[0], ids.shape[1]
        if attn_mask is not None and attn_mask.dim() != 2:
            raise ValueError("add_vectors needs a 2-D attention_mask [batch, past + current] (or none); "
                             f"got shape {tuple(attn_mask.shape)}")
        if attn_mask is not None:
            past = attn_mask.shape[1] - length
        else:
            past = cache.get_seq_length() if cache is not None else 0
        if self.prompt_length is None and self.positions != "all":
            # The first call inside the context is the (padded) prompt: generate() prefills it.
            self.prompt_length = past + length
        self.state = _CallState(active=True, batch=batch, **self._mask(attn_mask, past, length, ids.device))

    def _mask(self, attn_mask: torch.Tensor | None, past: int, length: int, device: torch.device) -> dict:
        current = None if attn_mask is None else attn_mask[:, past:]
        keep = None  # [T] bool over the current tokens; None = every token
        if self.positions != "all":
            cut = self.prompt_length
            prompt_only, response_only = past + length <= cut, past >= cut
            if (self.positions == "prompt" and response_only) or (self.positions == "response" and prompt_only):
                return {"steer": False, "mask": None}
            if not (prompt_only or response_only):  # this call holds both parts
                absolute = torch.arange(past, past + length, device=device)
                keep = absolute < cut if self.positions == "prompt" else absolute >= cut
        if current is None and keep is None:
            return {"steer": True, "mask": None}
        mask = torch.ones(1, length, dtype=self.dtype, device=device) if current is None else current.to(self.dtype)
        if keep is not None:
            mask = mask * keep.to(self.dtype)
        return {"steer": True, "mask": mask.unsqueeze(-1)}

    def post_hook(self, module, args, kwargs, output) -> None:
        self.state = _CallState()


def _steer_hook(key: str, delta: torch.Tensor, positions: _Positions) -> Callable:
    def hook(module, args, output):
        state = positions.state
        if not state.active:
            raise RuntimeError(f"add_vectors: {key} ran outside a forward call of the model passed to add_vectors "
                               "(call that model, not one of its submodules)")
        if not state.steer:
            return None
        hidden = _output_tensor(output)
        if hidden.shape[0] != delta.shape[0]:
            raise ValueError(f"add_vectors: {key} got a batch of {hidden.shape[0]} rows but the deltas have "
                             f"{delta.shape[0]} (one row per sequence; expand them for beams or multiple samples)")
        if state.mask is None:
            steered = hidden + delta
        else:
            mask = state.mask if state.mask.device == hidden.device else state.mask.to(hidden.device)
            steered = torch.addcmul(hidden, mask, delta)
        return _replace_output(output, steered)
    return hook


@contextlib.contextmanager
def add_vectors(model: nn.Module, deltas: dict[str, torch.Tensor], positions: str = "all",
                prompt_length: int | None = None) -> Iterator[None]:
    """Add a per-row vector to site outputs while the context is open.

    ``deltas`` maps ``"attn.L" | "mlp.L" | "block.L"`` to ``[batch, hidden]`` tensors that are
    already scaled by their multiplier; row ``i`` is added (as ``[batch, 1, hidden]``) to every
    steered position of sequence ``i``.  ``positions``: ``all``, ``prompt`` (absolute padded
    index < ``prompt_length``) or ``response`` (index >= ``prompt_length``); when
    ``prompt_length`` is None it is the length of the first forward call in the context
    (the prefill of ``generate()``).  Tokens whose attention mask is 0 are never steered.
    Call ``model`` itself (``model(...)`` or ``model.generate(...)``) inside the context.
    """
    modules = resolve_modules(model, list(deltas))
    param = next(model.parameters())
    pos = _Positions(positions, prompt_length, param.dtype)
    for key, value in deltas.items():
        if value.dim() != 2 or value.shape[1] != hidden_size(model):
            raise ValueError(f"delta {key!r} has shape {tuple(value.shape)}; expected [batch, {hidden_size(model)}]")
    rows = {t.shape[0] for t in deltas.values()}
    if len(rows) > 1:
        raise ValueError(f"all deltas need the same number of rows, got {sorted(rows)}")
    handles = []
    try:
        for key, value in deltas.items():
            # Cast once here so the per-token hook does a single fused add.
            delta = value.detach().to(device=param.device, dtype=param.dtype).unsqueeze(1)
            handles.append(modules[key].register_forward_hook(_steer_hook(key, delta, pos)))
        handles.append(model.register_forward_pre_hook(pos.pre_hook, with_kwargs=True))
        handles.append(model.register_forward_hook(pos.post_hook, with_kwargs=True, always_call=True))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    with _hooks(handles):
        yield


@contextlib.contextmanager
def record_activations(model: nn.Module, keys: list[str],
                       reduce: Callable[[str, torch.Tensor], torch.Tensor] | None = None
                       ) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record site outputs: yields ``{key: [output of each forward call, ...]}``.

    The hooks only read (they return None).  ``reduce(key, hidden)``, when given, is applied
    to each ``[batch, T, hidden]`` output before it is stored (extraction uses it to keep
    only the masked means instead of whole activations).
    """
    modules = resolve_modules(model, keys)
    records: dict[str, list[torch.Tensor]] = {key: [] for key in keys}

    def make(key: str) -> Callable:
        def hook(module, args, output) -> None:
            hidden = _output_tensor(output).detach()
            records[key].append(reduce(key, hidden) if reduce is not None else hidden)
        return hook

    handles = [modules[key].register_forward_hook(make(key)) for key in keys]
    with _hooks(handles):
        yield records


@contextlib.contextmanager
def stop_after_layer(model: nn.Module, layer: int) -> Iterator[None]:
    """Make every forward raise :class:`StopForward` once decoder layer ``layer`` has run.

    Register it after :func:`record_activations` so that layer's read hooks run first;
    the caller catches ``StopForward``.  Saves the deeper layers and the LM head.
    """
    block = find_layers(model)[layer].block

    def hook(module, args, output) -> None:
        raise StopForward

    with _hooks([block.register_forward_hook(hook)]):
        yield
