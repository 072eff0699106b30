"""Per-pair steering vectors: mean activation over the answer tokens, chosen minus rejected.

For a pair ``(prompt, chosen, rejected)`` the context is ``chat_prompt(tok, prompt)`` plus
the task's response prefix -- exactly the text generation continues -- and each answer
(after that prefix) is tokenized separately
(``add_special_tokens=False``) and appended, so the answer boundary is exact in token
space.  Every sequence runs once, in length-sorted left-padded batches; one read hook per
site reduces its output on the fly to the fp32 mean over the sequence's answer tokens
(never prompt, padding or the sequence's first token), and the forward stops after the
deepest layer needed.  The vector of a pair at a site is ``mean(chosen) - mean(rejected)``.

Resumable: pairs are processed in chunks, each saved (fp32 safetensors, with the pair
ids and a settings fingerprint) as soon as it is done; a restarted run reloads the chunks
whose ids and fingerprint match and computes only the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_process.progress import tqdm
from steering.hooks import StopForward, hidden_size, parse_key, record_activations, stop_after_layer
from steering.inputs import chat_prompt, left_pad

KINDS = ("diff", "pos", "neg")
PAIR_FIELDS = ("pair_id", "user_id", "sample_id", "prompt", "chosen", "rejected")


@dataclass
class Sequence:
    """Token ids of context + answer; the answer is ``ids[answer_start:]``."""

    ids: list[int]
    answer_start: int


def check_pair(pair: dict, where: str) -> None:
    """Raise a ValueError naming the record and field of a malformed pair."""
    for name in PAIR_FIELDS:
        value = pair.get(name)
        if value is None or (name in ("prompt", "chosen", "rejected") and not isinstance(value, str)):
            raise ValueError(f"{where}: pair {pair.get('pair_id')!r} has no valid {name!r} field")
        if name in ("chosen", "rejected") and not value.strip():
            raise ValueError(f"{where}: pair {pair['pair_id']!r} has an empty {name!r} answer")


def encode_pair(tok, pair: dict, max_answer_tokens: int, response_prefix: str = "") -> tuple[Sequence, Sequence]:
    """(chosen, rejected) sequences of one pair; answers cut to ``max_answer_tokens``.

    With a task's ``response_prefix`` the context ends with it, as in generation, and each
    answer (which starts with it) contributes only what follows it.
    """
    context = tok(chat_prompt(tok, pair["prompt"], response_prefix), add_special_tokens=False)["input_ids"]
    out = []
    for name in ("chosen", "rejected"):
        if not pair[name].startswith(response_prefix):
            raise ValueError(f"pair {pair['pair_id']!r}: the {name!r} answer does not start with the task's "
                             f"response prefix {response_prefix!r}")
        text = pair[name][len(response_prefix):]
        answer = tok(text, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        start = max(len(context), 1)  # the first token of a sequence is never averaged
        if len(context) + len(answer) <= start:
            raise ValueError(f"pair {pair['pair_id']!r}: the {name!r} answer has no token to average")
        out.append(Sequence(context + answer, start))
    return out[0], out[1]


@torch.inference_mode()
def answer_means(model, seqs: list[Sequence], keys: list[str], pad_id: int, batch_size: int = 16,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """``{key: [len(seqs), hidden]}`` fp32 mean site output over each sequence's answer tokens."""
    device = next(model.parameters()).device
    deepest = max(parse_key(k)[1] for k in keys)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))  # longest first: OOM shows at once
    out = {k: torch.zeros(len(seqs), hidden_size(model)) for k in keys}
    batch: dict[str, torch.Tensor] = {}

    def reduce(key: str, hidden: torch.Tensor) -> torch.Tensor:
        # Answers sit at the right end of left-padded rows: only the last `span` positions matter.
        tail = hidden[:, -batch["span"]:].float()
        tail = torch.where(batch["keep"], tail, 0.0)  # padding may hold NaN from fully masked rows
        return tail.sum(1) / batch["count"]

    starts = range(0, len(order), batch_size)
    with record_activations(model, keys, reduce=reduce) as rec, stop_after_layer(model, deepest):
        for start in tqdm(starts, desc="extract", unit="batch", disable=not progress, leave=False):
            rows = order[start:start + batch_size]
            chunk = [seqs[i] for i in rows]
            ids, mask = left_pad([s.ids for s in chunk], pad_id, device)
            lengths = [len(s.ids) - s.answer_start for s in chunk]
            span = max(lengths)  # from Python ints: no device sync
            counts = torch.tensor(lengths, device=device)
            offsets = torch.arange(span, device=device).unsqueeze(0)
            batch.update(span=span, count=counts.unsqueeze(1).float(),
                         keep=(offsets >= span - counts.unsqueeze(1)).unsqueeze(-1))
            try:
                model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      use_cache=False)
            except StopForward:
                pass
            index = torch.tensor(rows)
            for key in keys:
                out[key][index] = rec[key].pop().cpu()
    return out


def extract_pairs(model, tok, pairs: list[dict], keys: list[str], batch_size: int = 16,
                  max_answer_tokens: int = 256, progress: bool = True, response_prefix: str = ""
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """``{kind: {key: [n_pairs, hidden]}}`` fp32 for kind in diff, pos, neg (pairs order)."""
    seqs: list[Sequence] = []
    for pair in pairs:
        seqs.extend(encode_pair(tok, pair, max_answer_tokens, response_prefix))
    means = answer_means(model, seqs, keys, tok.pad_token_id, batch_size, progress)
    acts = {kind: {} for kind in KINDS}
    for key, m in means.items():
        acts["pos"][key], acts["neg"][key] = m[0::2], m[1::2]
        acts["diff"][key] = acts["pos"][key] - acts["neg"][key]
        check_finite(acts["diff"][key], pairs, key)
    return acts


def check_finite(vectors: torch.Tensor, pairs: list[dict], key: str, what: str = "vector") -> None:
    """A NaN/Inf row is an error naming its pair."""
    bad = (~torch.isfinite(vectors).all(1)).nonzero().flatten().tolist()
    if bad:
        ids = [pairs[i]["pair_id"] for i in bad[:5]]
        raise ValueError(f"non-finite {what} at {key} for pair(s) {ids}{' ...' if len(bad) > 5 else ''} "
                         f"({len(bad)} in all); check the model dtype (try --dtype float32) and these pairs' texts")


def chunk_fingerprint(settings: dict, keys: list[str], max_answer_tokens: int, response_prefix: str = "") -> str:
    """What a saved chunk of vectors was computed with; a chunk with another one is recomputed."""
    return json.dumps({**settings, "keys": sorted(keys), "max_answer_tokens": max_answer_tokens,
                       "response_prefix": response_prefix}, sort_keys=True)


def load_chunk(path: Path, pair_ids: list, fingerprint: str, keys: list[str]):
    """The activations saved in ``path`` if they are of these pairs and this fingerprint, else None."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint or json.loads(meta.get("pair_ids", "null")) != pair_ids:
            return None  # stale chunk from other settings or another pairs file: recompute
        return {kind: {k: f.get_tensor(f"{kind}/{k}") for k in keys} for kind in KINDS}


def save_chunk(path: Path, acts: dict[str, dict[str, torch.Tensor]], pair_ids: list, fingerprint: str) -> None:
    """Save one chunk's activations atomically, with its pair ids and fingerprint."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({f"{kind}/{k}": t.contiguous() for kind, d in acts.items() for k, t in d.items()},
              str(tmp), metadata={"fingerprint": fingerprint, "pair_ids": json.dumps(pair_ids)})
    os.replace(tmp, path)


def extract_chunked(model, tok, pairs: list[dict], keys: list[str], chunk_dir: str | Path, settings: dict,
                    chunk_pairs: int = 256, batch_size: int = 16, max_answer_tokens: int = 256,
                    response_prefix: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """:func:`extract_pairs` over chunks saved under ``chunk_dir`` (resumable)."""
    chunk_dir = Path(chunk_dir)
    chunk_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = chunk_fingerprint(settings, keys, max_answer_tokens, response_prefix)
    parts = []
    bar = tqdm(total=len(pairs), desc="pairs", unit="pair")
    for start in range(0, len(pairs), chunk_pairs):
        chunk = pairs[start:start + chunk_pairs]
        ids = [p["pair_id"] for p in chunk]
        path = chunk_dir / f"chunk_{start:08d}.safetensors"
        acts = load_chunk(path, ids, fingerprint, keys)
        if acts is None:
            acts = extract_pairs(model, tok, chunk, keys, batch_size, max_answer_tokens,
                                 response_prefix=response_prefix)
            save_chunk(path, acts, ids, fingerprint)
        parts.append(acts)
        bar.update(len(chunk))
    bar.close()
    return {kind: {k: torch.cat([p[kind][k] for p in parts]) if parts else
                   torch.zeros(0, hidden_size(model)) for k in keys} for kind in KINDS}
