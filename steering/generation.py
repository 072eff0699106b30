"""Batched, steerable generation shared by pair collection (03) and generation (05).

Prompts are user messages rendered with :func:`steering.inputs.chat_prompt`, tokenized,
sorted by token length (longest first, so padding is small and an out-of-memory batch
shows up at once) -- the one place rows are sorted and batched -- left padded and decoded
greedily by default.  Per-row steering deltas travel with their rows through the sort.
:func:`generate_batches` yields each finished batch (so a caller can write records as
they come); :func:`generate` returns every answer in input order.  An answer is the
decoded text up to EOS with an echoed role marker removed (:func:`clean_output`); what a
task makes of it is the task's ``postprocess``.

With ``share_prefix`` (unsteered generation), prompts that begin with the same tokens --
stage 03's tries of one chunk share everything up to the question -- are grouped
(:func:`prefix_groups`); each group's common prefix is run through the model once and its
key/value cache reused by every batch of the group, which then computes only its rows'
suffixes (left padded after the prefix: ``[prefix, pad.., suffix]``, positions from the
attention mask, so each row sees the positions it would see alone).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from data_process.progress import tqdm
from steering.hooks import POSITIONS, add_vectors
from steering.inputs import chat_prompt, left_pad

# A chat template's role marker that some models echo at the start of their answer.
# "model" only before a newline (Gemma's turn header): "Model: X" can be a real answer.
_ROLE_ECHO = re.compile(r"^\s*(?:<\|im_start\|>|<start_of_turn>)?\s*(?:assistant\s*(?::|\n)|model[ \t]*\n)\s*",
                        re.IGNORECASE)


def clean_output(text: str) -> str:
    """One generated text, stripped, with any leading echoed role marker (``assistant\\n``) removed."""
    text = text or ""
    while True:  # a model may echo the marker more than once
        stripped = _ROLE_ECHO.sub("", text, count=1)
        if stripped == text:
            return text.strip()
        text = stripped


def eos_ids(model, tok) -> list[int]:
    """Every token id that ends an answer: the generation config's EOS ids and the tokenizer's."""
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


class RowSampler(LogitsProcessor):
    """Sampling with one random generator per row, seeded by the row's own seed.

    ``generate``'s own sampling draws every row from one generator, so a row's answer
    would depend on the rows batched with it, and so on the batch size, the number of
    workers and where a resumed run restarted.  This processor draws each row's token
    from its own generator (temperature, then nucleus ``top_p``) and leaves only that
    token possible; generation then runs greedily.  It comes after any constraint.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        self.seeds, self.temperature, self.top_p = seeds, temperature, top_p
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.generators:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p.
            drop = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        chosen = torch.stack([torch.multinomial(row, 1, generator=g)
                              for row, g in zip(probs, self.generators, strict=True)])
        return torch.full_like(scores, float("-inf")).scatter(-1, chosen, 0.0)


def prompt_seed(seed: int, message: str) -> int:
    """The sampling seed of one prompt: the same prompt and seed sample the same answer in
    any batch, on any worker and in a resumed run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{message}".encode()).digest()[:8], "little")


def _sampling_kwargs(do_sample: bool, temperature: float, top_p: float) -> dict:
    # Sampling happens in RowSampler (per row); generate itself always decodes greedily.
    # Explicit None silences warnings from generation configs that set sampling values.
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def generate(model, tok, messages: list[str], **kwargs) -> list[str]:
    """Generate one answer per user message; answers in input order (see :func:`generate_batches`)."""
    results: list[str] = [""] * len(messages)
    for rows, texts in generate_batches(model, tok, messages, **kwargs):
        for i, text in zip(rows, texts, strict=True):
            results[i] = text
    return results


# A group must share at least this many prompt tokens: a shorter prefix (a chat template's
# header) saves less than the extra model call costs.
MIN_SHARED_TOKENS = 32


def _common_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(encoded: list[list[int]], min_shared: int = MIN_SHARED_TOKENS) -> list[tuple[int, list[int]]]:
    """``(shared prefix length, row indices)`` groups of token id lists, in order of first row.

    A row joins the first group whose prefix it shares for at least ``min_shared`` tokens
    when that saves more than it costs: the ``n`` tokens it shares must outnumber those its
    rows would compute again if the prefix shrank to ``n`` (so one odd row cannot cut a
    long shared prefix short).  The prefix leaves every row at least one token of its own.
    Rows in no such group form the last group, sharing the head they all have in common
    (e.g. a chat template's header and a task's fixed instructions; length 0 when it is
    under ``min_shared``).  The groups depend on the token ids alone.
    """
    groups: list[tuple[list[int], list[int]]] = []  # (prefix tokens, rows)
    for i, ids in enumerate(encoded):
        for g, (prefix, rows) in enumerate(groups):
            n = min(_common_length(prefix, ids), len(ids) - 1)
            if n >= min_shared and n > (len(prefix) - n) * len(rows):
                groups[g] = (prefix[:n], rows + [i])
                break
        else:
            groups.append((ids[:len(ids) - 1], [i]))
    shared = [(len(prefix), rows) for prefix, rows in groups if len(rows) > 1]
    alone = sorted(i for prefix, rows in groups if len(rows) == 1 for i in rows)
    if not alone:
        return shared
    head = min(len(encoded[i]) - 1 for i in alone)
    for i in alone[1:]:
        head = min(head, _common_length(encoded[alone[0]], encoded[i]))
    return shared + [(head if len(alone) > 1 and head >= min_shared else 0, alone)]


def prefix_sharing_supported(model) -> bool:
    """Whether a prefix's cache can be reused with padding between prefix and suffix: not
    with sliding-window attention, whose window would count the padding as tokens."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all("sliding" not in str(t) for t in layer_types)
    return not getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", True) is False


@torch.no_grad()
def generate_batches(model, tok, messages: list[str], *, max_new_tokens: int, batch_size: int = 16,
                     do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     deltas: dict[str, torch.Tensor] | None = None, positions: str = "all",
                     response_prefix: str = "", constraint: Callable[[int, int], Callable] | None = None,
                     share_prefix: bool = False, stats: dict[str, int] | None = None,
                     desc: str = "generate") -> Iterator[tuple[list[int], list[str]]]:
    """Yield ``(message indices, answers)`` batch by batch, longest prompts first.

    ``deltas`` maps hook sites (``attn.L`` / ``mlp.L`` / ``block.L``) to one steering row
    per message (``[len(messages), hidden]``, already scaled); each batch carries its own
    rows through :func:`steering.hooks.add_vectors`.  Batch composition depends only on the
    messages and ``batch_size``; a sampled answer depends only on its prompt and ``seed``
    (:class:`RowSampler`, :func:`prompt_seed`), and the global RNG is left untouched.

    ``response_prefix`` opens every answer (:func:`steering.inputs.chat_prompt`) and is
    part of the returned text; ``constraint(prompt_width, max_new_tokens)`` makes a
    batch's logits processor (:meth:`steering.decoding.ToolCallConstraint.processor`).

    ``share_prefix`` computes each group's shared prompt prefix once (see the module
    text; ignored with ``deltas``, which change the prefix per row, and for models with
    sliding-window attention).  ``stats`` (if given) gets ``prompt_tokens`` -- prompt
    positions run through the model, padding and shared prefixes included -- added.
    """
    if positions not in POSITIONS:
        raise ValueError(f"unknown positions {positions!r}; choose one of {list(POSITIONS)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if not messages:
        return
    _check_deltas(deltas, len(messages))
    device = next(model.parameters()).device
    encoded = [tok(chat_prompt(tok, m, response_prefix), add_special_tokens=False)["input_ids"] for m in messages]
    if share_prefix and not deltas and prefix_sharing_supported(model):
        groups = prefix_groups(encoded)
    else:
        groups = [(0, list(range(len(messages))))]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids(model, tok)[0]
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_ids(model, tok),
                  pad_token_id=pad_id, **_sampling_kwargs(do_sample, temperature, top_p))
    # Ties by index: the batches are a function of the messages alone.
    batches = [(shared, ordered[start:start + batch_size]) for shared, rows in groups
               for ordered in [sorted(rows, key=lambda i: (-len(encoded[i]), i))]
               for start in range(0, len(ordered), batch_size)]
    prefix_cache, cached_prefix = None, None
    for b, (shared, rows) in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False)):
        prefix = encoded[rows[0]][:shared]
        suffix_ids, suffix_mask = left_pad([encoded[i][shared:] for i in rows], pad_id, device)
        cache = None
        if shared:
            if prefix != cached_prefix:  # the group's first batch: its prefix, once
                prefix_cache, cached_prefix = _prefill(model, prefix, device), prefix
                _count(stats, shared)
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(rows))
        ids = torch.cat([torch.tensor([prefix] * len(rows), dtype=torch.long, device=device).view(len(rows), -1),
                         suffix_ids], dim=1)
        mask = torch.cat([torch.ones((len(rows), shared), dtype=torch.long, device=device), suffix_mask], dim=1)
        _count(stats, suffix_ids.numel())
        processors = [constraint(ids.shape[1], max_new_tokens)] if constraint is not None else []
        if do_sample:
            processors.append(RowSampler([prompt_seed(seed, messages[i]) for i in rows], temperature, top_p))
        batch_kwargs = {**kwargs, "logits_processor": LogitsProcessorList(processors)} if processors else kwargs
        if cache is not None:
            batch_kwargs = {**batch_kwargs, "cache": cache}
        new_tokens = _generate_batch(model, ids, mask, batch_kwargs, deltas, rows, positions, seed + b)
        yield rows, [clean_output(response_prefix + tok.decode(_cut_at_eos(t.tolist(), kwargs["eos_token_id"]),
                                                               skip_special_tokens=True)) for t in new_tokens]


def _count(stats: dict[str, int] | None, prompt_tokens: int) -> None:
    if stats is not None:
        stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + prompt_tokens


def _prefill(model, prefix: list[int], device) -> DynamicCache:
    """The key/value cache of one prompt prefix (batch of one)."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix], dtype=torch.long, device=device), cache=cache, use_cache=True)
    return cache


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
