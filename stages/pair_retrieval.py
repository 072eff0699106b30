"""Pair retrieval by request type: does a request retrieve pairs of its own type?

For every request of ``--split`` (``{run_dir}/ranked/{split}.jsonl``), the user's pairs
(``{run_dir}/pairs/pairs.jsonl``, stage 03) are retrieved as stage 05's fints retrieves
them -- its query text, ``--top-pairs``, ``--retriever`` from the config's ``generate``
section (:func:`steering.pair_retrieval.retrieved`) -- and the share of the same task type is
reported per request type (:func:`steering.pair_retrieval.same_type_share`).  A pair's type is
its ``type`` field, else its sample's in ``ranked/train.jsonl`` (pairs made before pairs
carried it).  Writes ``{run_dir}/pair_retrieval/{split}.json`` and prints a table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_process.artifact_io import read_jsonl, write_json
from data_process.config import stage_dir
from stages.common import load_samples, task_of, with_task_defaults
from stages.generate import GenerateConfig
from steering.pair_retrieval import retrieved, same_type_share, share_table


def _need(path: Path, script: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run scripts.{script} first (or check --run-dir, --split)")
    return path


def run(cfg: GenerateConfig) -> dict[str, Any]:
    """The same-type shares of ``cfg.split``'s requests; also written as JSON and printed."""
    cfg = with_task_defaults(cfg)
    task = task_of(cfg)
    ranked = stage_dir(cfg.run_dir, "ranked")
    pairs = read_jsonl(_need(stage_dir(cfg.run_dir, "pairs") / "pairs.jsonl", "03_collect_pairs"),
                       tolerate_torn_tail=False)
    samples = load_samples(_need(ranked / f"{cfg.split}.jsonl", "02_rank_history"))
    if any("type" not in s for s in samples):
        raise ValueError(f"{ranked / f'{cfg.split}.jsonl'}: samples carry no task 'type' (task {cfg.task!r})")
    types: dict[str, str] = {}
    if any("type" not in p for p in pairs):
        types = {s["id"]: s["type"] for s in load_samples(_need(ranked / "train.jsonl", "02_rank_history"))}
    user_pairs: dict[str, list[dict]] = {}
    for p in pairs:
        user_pairs.setdefault(str(p["user_id"]), []).append(p)
    picked = retrieved(pairs, samples, task.query, top_pairs=cfg.top_pairs, retriever=cfg.retriever,
                       pair_weighting=cfg.pair_weighting, softmax_temperature=cfg.softmax_temperature)
    rows = same_type_share(samples, picked, lambda p: p.get("type") or types.get(p["sample_id"], "?"), user_pairs)
    result = {"split": cfg.split, "top_pairs": cfg.top_pairs, "retriever": cfg.retriever, "n_pairs": len(pairs),
              "by_type": rows}
    out = stage_dir(cfg.run_dir, "pair_retrieval") / f"{cfg.split}.json"
    write_json(out, result)
    print(f"Pairs retrieved for {cfg.split} (top {cfg.top_pairs}, {cfg.retriever}): share of the request's type\n")
    print(share_table(rows))
    print(f"\n-> {out}")
    return result
