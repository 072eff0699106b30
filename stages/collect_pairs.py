"""Stage 03: collect contrast pairs (gold output vs. an answer written without the user).

Reads {run_dir}/ranked/train.jsonl (and remain_train.jsonl for other users' items) and
writes {run_dir}/pairs/pairs.jsonl, progress.jsonl (per-sample done-markers: a killed
run resumes where it stopped), summary.json and manifest.json (last).  How a try is
judged is the task's collector (``Task.pair_collector``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from collect import COLLECTORS
from collect.pairs import RAG_MODES, PairWriter, summarize
from data_process.artifacts import Stage, read_jsonl, write_json
from data_process.config import choose, stage_dir
from stages.common import StageConfig, load_samples, require, task_of
from steering.model import load_model, model_name
from tasks.base import DEFAULT_MAX_PROMPT_TOKENS, count_cut_inputs

log = logging.getLogger(__name__)


@dataclass
class CollectPairsConfig(StageConfig):
    """Stage 03 settings (config section ``collect_pairs``); unset values come from the task."""

    STAGE = "03_collect_pairs"
    SECTIONS = ("collect_pairs",)
    # Rows of a batch are generated independently (left padding is masked), and chunks
    # only set how often progress is saved.
    NOT_IN_FINGERPRINT = StageConfig.NOT_IN_FINGERPRINT | {"batch_size", "samples_per_chunk", "collect_model"}

    collect_model: str = field(default="", metadata={"help": "model that writes the negatives (local dir); empty = --model"})
    num_neg_per_user: int = field(default=2, metadata={"min": 1, "help": "generation tries per training sample (each may become one pair)"})
    history_k: int | None = field(default=None, metadata={"min": 0, "help": "history items in each try's prompt (default: the task's)"})
    rag: str = field(default="others", metadata={"help": "history of a try: others (random samples of other users) | "
                                                         "history (the user's own ranked history)", "choices": list(RAG_MODES)})
    threshold: float | None = field(default=None, metadata={"min": 0, "max": 1, "help": "keep a try when its ROUGE-L F1 vs the gold is below this (default: the task's)"})
    max_new_tokens: int | None = field(default=None, metadata={"min": 1, "help": "generation length (default: the task's)"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "prompts per generation batch"})
    samples_per_chunk: int = field(default=64, metadata={"min": 1, "help": "samples whose tries are generated together (the resume granularity)"})
    max_prompt_tokens: int = field(default=DEFAULT_MAX_PROMPT_TOKENS, metadata={"min": 1, "help": "token budget of a prompt; history is shortened/dropped to fit"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    sampling_temperature: float = field(default=1.0, metadata={"gt": 0, "help": "sampling temperature (with --do-sample)"})
    top_p: float = field(default=1.0, metadata={"gt": 0, "max": 1, "help": "nucleus sampling mass (with --do-sample)"})
    max_samples: int = field(default=0, metadata={"min": 0, "help": "collect for the first N training samples only (0 = all; for quick runs)"})
    search_threshold: float | None = field(default=None, metadata={"min": 0, "max": 1, "help": "PersonalWAB: a search call is correct when its result score 1 - rank/len(results) exceeds this"})
    recommend_in_list: bool | None = field(default=None, metadata={"help": "PersonalWAB: a recommendation counts as correct when the target is in the returned list"})
    review_threshold: float | None = field(default=None, metadata={"min": -1, "max": 1, "help": "PersonalWAB: a review whose similarity to the gold review is below this is a negative"})
    positive_k: int | None = field(default=None, metadata={"min": 0, "help": "PersonalWAB: history items in the prompt that collects positives"})
    constrained: bool | None = field(default=None, metadata={"help": "decode only valid calls of the task's call schema (default: the task's)"})


def _report(summary: dict) -> None:
    totals = summary["totals"]
    dropped = ", ".join(f"{k[len('dropped_'):]} {v}" for k, v in totals.items() if k.startswith("dropped_"))
    log.info("[03_collect_pairs] samples %s  tries %s  kept %s  dropped: %s", totals.get("samples", 0),
             totals.get("tries", 0), totals.get("kept", 0), dropped)
    for user, row in summary["per_user"].items():
        log.info("  %s: %s samples, kept %s/%s", user, row.get("samples", 0), row.get("kept", 0), row.get("tries", 0))
    if summary["users_without_pairs"]:
        log.warning("[03_collect_pairs] %d user(s) without pairs: %s", len(summary["users_without_pairs"]),
                    ", ".join(summary["users_without_pairs"]))
    if summary.get("parse_failures", {}).get("total"):
        log.warning("[03_collect_pairs] unparseable answers by reason: %s", summary["parse_failures"])
    if summary.get("rouge_l", {}).get("quantiles"):
        log.info("[03_collect_pairs] ROUGE-L of distinct tries: %s; kept below other thresholds: %s",
                 summary["rouge_l"]["quantiles"], summary["rouge_l"]["kept_below"])


def run(cfg: CollectPairsConfig) -> dict[str, Any] | None:
    """Collect (or resume) the pairs; return the manifest (None when the stage had finished)."""
    task = task_of(cfg)
    require(cfg, "history_k", "max_new_tokens")
    collector = choose("pair collector", task.pair_collector, COLLECTORS)
    ranked = stage_dir(cfg.run_dir, "ranked")
    train_path, remain_path = ranked / "train.jsonl", ranked / "remain_train.jsonl"
    if not train_path.exists():
        raise FileNotFoundError(f"{train_path}: run scripts.02_rank_history first")
    model_dir = cfg.collect_model or cfg.model
    stage = Stage(cfg.STAGE, stage_dir(cfg.run_dir, "pairs"), cfg, overwrite=cfg.overwrite,
                  inputs=[p for p in (train_path, remain_path) if p.exists()], model=model_dir)
    if stage.done:
        return None
    other_samples = load_samples(train_path)  # every user's samples, also past --max-samples
    samples = other_samples[:cfg.max_samples] if cfg.max_samples else other_samples
    inputs = [train_path]
    if remain_path.exists():
        other_samples = other_samples + load_samples(remain_path, allow_empty=True)
        inputs.append(remain_path)
    else:
        log.warning("%s missing: other users' items come from train.jsonl only", remain_path)
    model, tok = load_model(model_dir, cfg.device, cfg.dtype, layers_attr=cfg.layers_attr)
    writer = PairWriter(stage.start())
    try:
        summary = collector(cfg, task, samples, other_samples, model, tok, writer)
    finally:
        writer.close()
    # The done-markers of every run (a resumed one too) give the counts.
    summary = {**summary, **summarize(read_jsonl(writer.progress_path), {s["user_id"] for s in samples}),
               "prompts_cut": count_cut_inputs(task, samples, tok, cfg.max_prompt_tokens, cfg.STAGE)}
    summary_path = stage.out_dir / "summary.json"
    write_json(summary_path, summary)
    _report(summary)
    return stage.finish(inputs=inputs, outputs=[writer.pairs_path, writer.progress_path, summary_path],
                        model=model_name(model), seed=cfg.seed, collect_model=str(model_dir),
                        totals=summary.get("totals"), users_without_pairs=summary.get("users_without_pairs"),
                        prompts_cut=summary["prompts_cut"])
