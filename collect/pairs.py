"""Stage 03 library: contrast pairs (gold output vs. the model's output without the user).

For every training sample, ``num_neg_per_user`` tries prompt the model with ``history_k``
history items of OTHER users (``rag="others"``, seeded per sample) or with the user's
own ranked history (``rag="history"``); a try whose answer has ROUGE-L F1 below the
task threshold against the gold becomes a pair's ``rejected`` side, the gold its
``chosen`` side.  A pair's ``prompt`` is the question without any history; its ``query``
is the task's query text of the sample (what stage 05 retrieves pairs by).

Resume: :class:`PairWriter` appends pairs to ``pairs.jsonl`` and, after a sample's
last pair, one line to ``progress.jsonl`` (the sample's done-marker with its counts, so
samples that kept no pair are not redone).  On reopening, pairs of samples without a
marker (a kill between the two writes) are removed, so a resumed run has neither
duplicates nor gaps.  The generator is injected, so tests use a fake one.
"""

from __future__ import annotations

import functools
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from data_process.artifacts import JsonlWriter, read_jsonl, write_jsonl
from data_process.config import choose
from eval.metrics import rouge_l
from steering.decoding import decoding_kwargs
from steering.generation import generate
from tasks import Task
from tasks.base import DEFAULT_MAX_PROMPT_TOKENS

RAG_MODES = ("others", "history")
SCORE_CUTS = (0.15, 0.2, 0.3, 0.4, 0.5)


class PairWriter:
    """``pairs.jsonl`` plus ``progress.jsonl`` done-markers, resumable per sample.

    ``write(record)`` appends one pair; ``mark_done(sample_id, **counts)`` closes a
    sample.  ``done_ids`` / ``existing`` hold what earlier runs finished.
    """

    def __init__(self, out_dir: str | Path):
        out_dir = Path(out_dir)
        self.pairs_path, self.progress_path = out_dir / "pairs.jsonl", out_dir / "progress.jsonl"
        self.progress = JsonlWriter(self.progress_path)
        self.done_ids = {r["sample_id"] for r in self.progress.existing}
        if self.pairs_path.exists():
            kept = [r for r in read_jsonl(self.pairs_path) if r.get("sample_id") in self.done_ids]
            write_jsonl(self.pairs_path, kept)  # drops pairs of a sample cut off mid-way
        self.pairs = JsonlWriter(self.pairs_path)
        self.existing = self.pairs.existing

    def write(self, record: dict[str, Any]) -> None:
        self.pairs.write(record)

    def mark_done(self, sample_id: str, **counts: Any) -> None:
        self.progress.write({"sample_id": sample_id, **counts})
        self.done_ids.add(sample_id)

    def close(self) -> None:
        self.pairs.close()
        self.progress.close()


def other_users_pools(samples: list[dict], other_samples: list[dict]) -> dict[str, list[dict]]:
    """For each user in ``samples``: the items of ``other_samples`` written by other users.

    An item whose id is one of the user's own samples or history items is left out too,
    in case two users share an item.
    """
    unique = list({s["id"]: s for s in other_samples}.values())
    own: dict[str, set[str]] = defaultdict(set)
    for s in samples + unique:
        own[s["user_id"]].add(s["id"])
        own[s["user_id"]].update(h["id"] for h in s.get("history", []))
    users = {s["user_id"] for s in samples}
    return {u: [s for s in unique if s["user_id"] != u and s["id"] not in own[u]] for u in users}


def try_histories(sample: dict, pool: list[dict], *, k: int, tries: int, rag: str, seed: int) -> list[list[dict]]:
    """The history of each try of ``sample``, seeded by (seed, sample id) alone."""
    rng = random.Random(f"{seed}:{sample['id']}")  # str seeds are stable across runs
    if rag == "others":
        return [rng.sample(pool, min(k, len(pool))) for _ in range(tries)]
    if rag != "history":
        raise ValueError(f"unknown rag mode {rag!r}; choose one of {list(RAG_MODES)}")
    own = [h for h in sample["history"] if h["id"] != sample["id"]]
    # Try 0 is the top-k ranked items; later tries draw k at random so that greedy
    # decoding does not just repeat the first answer.
    return [own[:k]] + [rng.sample(own, min(k, len(own))) for _ in range(tries - 1)]


@dataclass
class PairSettings:
    """What :func:`collect_pairs` needs from the stage config."""

    task: Task
    k: int = 5
    tries: int = 2
    rag: str = "others"
    threshold: float = 0.15
    seed: int = 42
    samples_per_chunk: int = 64
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS

    @classmethod
    def from_config(cls, cfg: Any, task: Task) -> PairSettings:
        """From the stage-03 config (``stages.collect_pairs.CollectPairsConfig``)."""
        if cfg.threshold is None:
            raise ValueError(f"task {task.name!r} has no default ROUGE-L threshold; pass --threshold")
        return cls(task=task, k=cfg.history_k, tries=cfg.num_neg_per_user, rag=cfg.rag,
                   threshold=cfg.threshold, seed=cfg.seed,
                   samples_per_chunk=cfg.samples_per_chunk, max_prompt_tokens=cfg.max_prompt_tokens)


def generator_for(cfg: Any, task: Task, model, tok, desc: str) -> Callable[[list[str]], list[str]]:
    """Messages -> answers with the stage-03 decoding settings of ``cfg`` and ``task``'s
    response prefix (and call constraint with ``cfg.constrained``), as stage 05 decodes."""
    return functools.partial(generate, model, tok, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                             do_sample=cfg.do_sample, temperature=cfg.sampling_temperature, top_p=cfg.top_p,
                             seed=cfg.seed, desc=desc, **decoding_kwargs(task, model, tok, getattr(cfg, "constrained", None)))


def collect_text_pairs(cfg: Any, task: Task, samples: list[dict], other_samples: list[dict], model, tok,
                       writer: PairWriter) -> dict[str, Any]:
    """Stage 03 for a text task: tries judged by ROUGE-L against the gold."""
    return collect_pairs(samples, other_samples, generator_for(cfg, task, model, tok, "generate negatives"),
                         PairSettings.from_config(cfg, task), writer, tokenizer=tok)


def _judge(sample: dict, answers: list[str], s: PairSettings, prompt: str) -> tuple[list[dict], dict]:
    """Pairs kept from one sample's answers, the kept/dropped counts and the distinct tries' scores."""
    counts: Counter = Counter(tries=len(answers))
    records, seen, scores = [], set(), []
    for t, answer in enumerate(answers):
        answer = s.task.postprocess(answer).strip()
        if not answer:
            counts["dropped_empty"] += 1
            continue
        if answer in seen:
            counts["dropped_duplicate"] += 1  # the same negative twice adds nothing
            continue
        seen.add(answer)
        score = rouge_l(answer, sample["output"])
        scores.append(round(score, 4))
        if score >= s.threshold:
            counts["dropped_similar"] += 1
            continue
        counts["kept"] += 1
        records.append({"pair_id": f"{sample['id']}-n{t}", "user_id": sample["user_id"],
                        "sample_id": sample["id"], "prompt": prompt, "query": s.task.query(sample),
                        "chosen": sample["output"],
                        "rejected": answer, "rouge_l": round(score, 4)})
    return records, {**counts, "scores": scores}


def collect_pairs(samples: list[dict], other_samples: list[dict], generator: Callable[[list[str]], list[str]],
                  settings: PairSettings, writer: PairWriter, tokenizer=None) -> dict[str, Any]:
    """Collect pairs for the samples ``writer`` has not finished; return the run summary.

    ``generator`` maps user messages to answers (in order), e.g. :func:`generator_for`.
    All tries of ``samples_per_chunk`` samples go to it in one call, so it can batch
    across samples.
    """
    choose("rag mode", settings.rag, dict.fromkeys(RAG_MODES))
    pools = other_users_pools(samples, other_samples) if settings.rag == "others" else {}
    todo = [s for s in samples if s["id"] not in writer.done_ids]
    bar = tqdm(total=len(todo), desc="collect pairs", unit="sample")
    markers: list[dict] = []
    for start in range(0, len(todo), settings.samples_per_chunk):
        chunk = todo[start:start + settings.samples_per_chunk]
        messages = []
        for sample in chunk:
            for history in try_histories(sample, pools.get(sample["user_id"], []), k=settings.k,
                                         tries=settings.tries, rag=settings.rag, seed=settings.seed):
                messages.append(settings.task.prompt(sample, history, tokenizer, settings.max_prompt_tokens))
        answers = generator(messages)
        if len(answers) != len(messages):
            raise RuntimeError(f"generator returned {len(answers)} answers for {len(messages)} prompts")
        for j, sample in enumerate(chunk):
            prompt = settings.task.prompt(sample, [], tokenizer, settings.max_prompt_tokens)
            tries = answers[j * settings.tries:(j + 1) * settings.tries]
            records, counts = _judge(sample, tries, settings, prompt)
            for record in records:
                writer.write(record)
            writer.mark_done(sample["id"], user_id=sample["user_id"], **counts)
            markers.append({"sample_id": sample["id"], "user_id": sample["user_id"], **counts})
            bar.update(1)
    bar.close()
    progress = getattr(writer, "progress_path", None)
    if progress is not None and Path(progress).exists():
        markers = read_jsonl(progress)  # earlier (resumed) runs count too
    return summarize(markers, {s["user_id"] for s in samples})


def summarize(progress: list[dict], users: set[str]) -> dict[str, Any]:
    """Kept/dropped counts per user and overall, from the done-markers of every run."""
    keys = ("tries", "kept", "dropped_similar", "dropped_empty", "dropped_duplicate")
    per_user = {u: dict.fromkeys(("samples",) + keys, 0) for u in sorted(users)}
    for marker in progress:
        row = per_user.setdefault(marker["user_id"], dict.fromkeys(("samples",) + keys, 0))
        row["samples"] += 1
        for key in keys:
            row[key] += int(marker.get(key, 0))
    totals = {key: sum(row[key] for row in per_user.values()) for key in ("samples",) + keys}
    empty = sorted(u for u, row in per_user.items() if row["kept"] == 0)
    scores = sorted(x for marker in progress for x in marker.get("scores", []))
    # How many distinct tries other thresholds would keep: helps tune --threshold per dataset.
    below = {str(t): sum(x < t for x in scores) for t in SCORE_CUTS}
    quantiles = {f"p{q}": scores[min(len(scores) - 1, len(scores) * q // 100)] for q in (10, 25, 50, 75, 90)} if scores else {}
    return {"totals": totals, "per_user": per_user, "users_without_pairs": empty,
            "rouge_l": {"quantiles": quantiles, "kept_below": below}}
