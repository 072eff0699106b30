"""One steered batch of requests: every row its own prompt, vector, length and sampling.

The batch is built exactly as :func:`steering.generation.generate_batches` builds stage
05's (left padding, the same generation call and EOS ids, per-row steering rows through
:func:`steering.hooks.add_vectors`, :class:`RowSampler` seeded by the row's prompt,
:func:`clean_output`), so a row's answer is the one 05 writes: a mixed batch equals each
row run alone (a property the steering tests pin).  What differs from 05 is only what a
server needs: each row stops at its own ``max_tokens`` (a per-row stopping criterion; a
finished row is padded while the others go on), and rows may sample with their own
temperature, top-p and seed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from steering.generation import RowSampler, clean_output, eos_ids, prompt_seed
from steering.hooks import add_vectors
from steering.inputs import left_pad


@dataclass
class Row:
    """One request, ready to batch."""

    ids: list[int]                          # the prompt's tokens (chat template applied)
    seed_text: str                          # what the sampling seed hashes (05: the user message)
    max_new_tokens: int
    deltas: dict[str, torch.Tensor] | None = None  # site key -> [hidden], already scaled
    positions: str = "all"
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    response_prefix: str = ""               # opens the answer (task mode: the task's)
    constraint: Callable | None = None      # task mode, --constrained: the call grammar
    adapter_user: str | None = None         # run under this user's LoRA adapter
    postprocess: Callable[[str], str] = str.strip
    stops: list[str] = field(default_factory=list)

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one generate call: the same answer prefix and
        grammar (whose length budget is the batch's), steered positions and adapter.  An
        unsteered row adds zeros, so it joins any positions."""
        return (self.response_prefix, self.constraint is not None and self.max_new_tokens,
                self.positions if self.deltas else "all", self.adapter_user)


@dataclass
class Result:
    text: str
    finish_reason: str          # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int


class _RowLimits(StoppingCriteria):
    """Row i is done once it has ``limits[i]`` new tokens (generate pads it from then on)."""

    def __init__(self, limits: list[int], width: int):
        self.limits, self.width = torch.tensor(limits), width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return (input_ids.shape[1] - self.width >= self.limits).to(input_ids.device)


class _RowSamplers(LogitsProcessor):
    """Each sampling row drawn by its own :class:`RowSampler` (05's per-row sampler, one row
    at a time, so rows may differ in temperature and top-p); greedy rows are left alone."""

    def __init__(self, rows: list[Row]):
        self.samplers = {i: RowSampler([prompt_seed(r.seed, r.seed_text)], r.temperature, r.top_p)
                         for i, r in enumerate(rows) if r.do_sample}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for i, sampler in self.samplers.items():
            out[i:i + 1] = sampler(input_ids[i:i + 1], scores[i:i + 1])
        return out


def _batch_deltas(rows: list[Row], hidden: int) -> dict[str, torch.Tensor]:
    """``{key: [rows, hidden]}`` over every key any row steers; other rows get zeros (an
    exact no-op: ``x + 0 == x``)."""
    keys = sorted({k for r in rows for k in (r.deltas or {})})
    return {k: torch.stack([r.deltas[k].float() if r.deltas and k in r.deltas else torch.zeros(hidden)
                            for r in rows]) for k in keys}


def _stop_at(text: str, stops: list[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


@torch.no_grad()
def generate_rows(model, tok, rows: list[Row], adapters=None) -> list[Result]:
    """Generate every row of one batch (rows share :meth:`Row.batch_key`); results in row order.

    ``adapters`` (:class:`steering.runner.UserAdapters`) are switched to the rows'
    user, or off for rows of the base model, as stage 05 does.
    """
    assert len({r.batch_key() for r in rows}) == 1, "rows of one batch share their batch key"
    first = rows[0]
    device = next(model.parameters()).device
    eos = eos_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    ids, mask = left_pad([r.ids for r in rows], pad_id, device)
    width, max_new = ids.shape[1], max(r.max_new_tokens for r in rows)
    processors = [first.constraint(width, max_new)] if first.constraint is not None else []
    if any(r.do_sample for r in rows):
        processors.append(_RowSamplers(rows))
    kwargs = dict(max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad_id, do_sample=False,
                  temperature=None, top_p=None, top_k=None,
                  stopping_criteria=StoppingCriteriaList([_RowLimits([r.max_new_tokens for r in rows], width)]))
    if processors:
        kwargs["logits_processor"] = LogitsProcessorList(processors)
    run_model = adapters.model.get_base_model() if adapters else model
    deltas = _batch_deltas(rows, model.config.hidden_size)
    if adapters is None:
        adapter = nullcontext()
    else:
        adapter = adapters.active(first.adapter_user) if first.adapter_user else adapters.model.disable_adapter()
    with adapter, add_vectors(run_model, deltas, positions=first.positions, prompt_length=width) if deltas \
            else nullcontext():
        out = run_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    results = []
    for row, tokens in zip(rows, out[:, width:].tolist(), strict=True):
        tokens = tokens[:row.max_new_tokens]
        ended = next((j for j, t in enumerate(tokens) if t in eos), None)
        tokens = tokens if ended is None else tokens[:ended]
        text = row.postprocess(clean_output(row.response_prefix + tok.decode(tokens, skip_special_tokens=True)))
        cut = _stop_at(text, row.stops)
        reason = "stop" if ended is not None or cut is not None else "length"
        results.append(Result(text if cut is None else text[:cut], reason, len(row.ids), len(tokens)))
    return results
