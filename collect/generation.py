"""Batched generation shared by pair collection, steered generation and PersonalWAB.

Prompts are user messages rendered with :func:`steering.model.chat_prompt`, sorted by
length (longest first, so padding is small and an out-of-memory batch shows up at
once), left padded, decoded greedily by default and returned in input order.  Per-row
steering deltas travel with their rows through the sort.

Outputs are cleaned per ``form`` by :func:`clean_output`.  A malformed output (no JSON
object, no ``print("...")``) becomes ``""``; it is logged and counted in the
module-level :data:`MALFORMED` counter (keys are forms) so a caller can report how many
outputs it lost, e.g. ``generation.MALFORMED["json"]``; :func:`reset_malformed` zeroes it.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from steering.hooks import add_vectors
from steering.model import chat_prompt, left_pad

log = logging.getLogger(__name__)

FORMS = ("raw", "json", "python")
POSITIONS = ("all", "prompt", "response")

# Malformed outputs seen so far, per form (never reset implicitly).
MALFORMED: Counter[str] = Counter()

# A chat template's role marker that some models echo at the start of their answer.
# "model" only before a newline (Gemma's turn header): "Model: X" can be a real answer.
_ROLE_ECHO = re.compile(r"^\s*(?:<\|im_start\|>|<start_of_turn>)?\s*(?:assistant\s*(?::|\n)|model[ \t]*\n)\s*",
                        re.IGNORECASE)
_JSON_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_PRINT_CALL = re.compile(r"print\(\s*([rRuU]?(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|\"(?:[^\"\\\n]|\\.)*\""
                         r"|'(?:[^'\\\n]|\\.)*'))\s*\)")


def reset_malformed() -> None:
    """Zero the :data:`MALFORMED` counter (e.g. at the start of a stage)."""
    MALFORMED.clear()


def _malformed(form: str, text: str) -> str:
    MALFORMED[form] += 1
    log.warning("malformed %s output (%d so far): %.80r", form, MALFORMED[form], text)
    return ""


def json_objects(text: str) -> Iterator[tuple[dict, str]]:
    """Every JSON object in ``text`` as ``(object, its source text)``: the contents of
    ```json fences first, then the whole text, each scanned left to right."""
    decoder = json.JSONDecoder()
    for candidate in [m.group(1) for m in _JSON_FENCE.finditer(text)] + [text]:
        for match in re.finditer(r"\{", candidate):
            try:
                obj, end = decoder.raw_decode(candidate, match.start())
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj, candidate[match.start():end]


def clean_output(text: str, form: str = "raw") -> str:
    """Clean one generated text.

    ``raw``: stripped, with a leading echoed role marker (``assistant\\n``) removed.
    ``json``: the first JSON object (fenced ```json blocks are looked at first), as text.
    ``python``: the string argument of the first ``print("...")``.
    A malformed ``json`` / ``python`` output returns ``""`` and counts in :data:`MALFORMED`.
    """
    if form not in FORMS:
        raise ValueError(f"unknown output form {form!r}; choose one of {list(FORMS)}")
    text = text or ""
    while True:  # a model may echo the marker more than once
        stripped = _ROLE_ECHO.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    text = text.strip()
    if form == "raw":
        return text
    if form == "json":
        for _, source in json_objects(text):
            return source
        return _malformed(form, text)
    match = _PRINT_CALL.search(text)
    if match:
        try:
            value = ast.literal_eval(match.group(1))
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, str):
            return value
    return _malformed(form, text)


def _eos_ids(model, tok) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def _cut_at_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    # Rows that finished early are padded to the batch's length after their EOS.
    for j, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:j]
    return tokens


def _check_deltas(deltas: dict[str, torch.Tensor] | None, n: int) -> None:
    for key, value in (deltas or {}).items():
        if value.dim() != 2 or value.shape[0] != n:
            raise ValueError(f"deltas[{key!r}] has shape {tuple(value.shape)}; expected "
                             f"[{n}, hidden] (one row per message)")


def _sampling_kwargs(do_sample: bool, temperature: float, top_p: float) -> dict:
    if do_sample:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    # Explicit None silences warnings from generation configs that set sampling values.
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@torch.no_grad()
def generate(model, tok, messages: list[str], *, max_new_tokens: int, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             form: str = "raw", deltas: dict[str, torch.Tensor] | None = None,
             positions: str = "all", desc: str = "generate") -> list[str]:
    """Generate one answer per user message; results in input order, cleaned per ``form``.

    ``deltas`` maps hook sites (``attn.L`` / ``mlp.L`` / ``block.L``) to one steering row
    per message (``[len(messages), hidden]``, already scaled); each batch carries its own
    rows through :func:`steering.hooks.add_vectors`.  Sampling is reproducible for a
    given ``seed``, message list and ``batch_size``; the global RNG is left untouched.
    """
    if form not in FORMS:
        raise ValueError(f"unknown output form {form!r}; choose one of {list(FORMS)}")
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; choose one of {list(POSITIONS)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if not messages:
        return []
    _check_deltas(deltas, len(messages))
    device = next(model.parameters()).device
    encoded = [tok(chat_prompt(tok, m), add_special_tokens=False)["input_ids"] for m in messages]
    order = sorted(range(len(messages)), key=lambda i: -len(encoded[i]))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else _eos_ids(model, tok)[0]
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=_eos_ids(model, tok),
                  pad_token_id=pad_id, **_sampling_kwargs(do_sample, temperature, top_p))
    results: list[str] = [""] * len(messages)
    starts = range(0, len(order), batch_size)
    for b, start in enumerate(tqdm(starts, desc=desc, unit="batch", leave=False)):
        rows = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in rows], pad_id, device)
        texts = _generate_batch(model, ids, mask, kwargs, deltas, rows, positions, seed + b)
        for i, new_tokens in zip(rows, texts):
            new_tokens = _cut_at_eos(new_tokens.tolist(), kwargs["eos_token_id"])
            results[i] = clean_output(tok.decode(new_tokens, skip_special_tokens=True), form)
    return results


def _generate_batch(model, ids, mask, kwargs, deltas, rows, positions, seed) -> list[torch.Tensor]:
    """Run one padded batch (steered when ``deltas``) and return its new tokens per row."""
    devices = [ids.device] if ids.device.type == "cuda" else []
    # fork_rng keeps each batch's sampling independent of what ran before it.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if deltas:
            index = torch.tensor(rows, dtype=torch.long)
            batch_deltas = {k: v[index].to(ids.device) for k, v in deltas.items()}
            with add_vectors(model, batch_deltas, positions=positions, prompt_length=ids.shape[1]):
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return list(out[:, ids.shape[1]:])
