"""Stage 03: collect contrast pairs (gold output vs. an answer written without the user).

Reads {run_dir}/ranked/train.jsonl (and remain_train.jsonl for other users' items) and
writes {run_dir}/pairs/pairs.jsonl, progress.jsonl (per-sample done-markers: a killed
run resumes where it stopped), summary.json and manifest.json (last).  How a chunk's
tries are made and judged is the task's collector (``Task.pair_collector``, see
:mod:`collect`); the chunks are the stage's, computed here or on workers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collect import COLLECTORS
from collect.loop import PairWriter
from collect.pairs import OTHERS_POOLS, RAG_MODES
from data_process.artifact_io import write_json
from data_process.config import choose, stage_dir
from data_process.stage import Stage
from stages.common import DecodingSettings, PromptSettings, load_samples, require, task_of, with_task_defaults
from stages.train_sasrec import setup_files
from stages.workers import WorkersConfig, absolute_paths, run_chunks, unfinished, user_chunks, write_in_order
from steering.loading import load_model, load_tokenizer
from tasks.base import count_cut_inputs

log = logging.getLogger(__name__)


@dataclass
class CollectPairsConfig(WorkersConfig, PromptSettings, DecodingSettings):
    """Stage 03 settings (config sections ``prompt``, ``decoding``, then ``collect_pairs``);
    unset values come from the task."""

    STAGE = "03_collect_pairs"
    SECTIONS = ("prompt", "decoding", "collect_pairs")
    # Rows of a batch are generated independently (left padding is masked; a shared
    # prefix's cache holds the keys and values the row would compute itself), and chunks
    # only set how often progress is saved (except with --others-pool chunk, see below).
    NOT_IN_FINGERPRINT = WorkersConfig.NOT_IN_FINGERPRINT | {"batch_size", "samples_per_chunk", "collect_model",
                                                             "share_prefix"}

    collect_model: str = field(default="", metadata={
        "help": "model that writes the negatives (local dir); empty = --model"})
    tries: int = field(default=2, metadata={
        "min": 1, "help": "generation tries per training sample (each may become one pair)"})
    rag: str = field(default="others", metadata={
        "help": "history of a try: others (random samples of other users) | history (the user's own ranked history)",
        "choices": list(RAG_MODES)})
    others_pool: str = field(default="sample", metadata={
        "help": "with rag others: draw other users' items per sample | once per chunk and try (all prompts of a "
                "chunk's try then share their prefix, computed once)", "choices": list(OTHERS_POOLS)})
    share_prefix: bool = field(default=True, metadata={
        "help": "compute a prompt prefix shared by several tries once and reuse its key/value cache "
                "(same greedy answers; off = every prompt computed whole)"})
    threshold: float | None = field(default=None, metadata={
        "min": 0, "max": 1,
        "help": "keep a try when its ROUGE-L F1 vs the gold is below this (default: the task's)"})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "prompts per generation batch"})
    samples_per_chunk: int = field(default=64, metadata={
        "min": 1, "help": "samples (of whole users) whose tries are generated together: "
                          "the unit a worker computes and a resumed run redoes"})
    max_samples: int = field(default=0, metadata={
        "min": 0, "help": "collect for the first N training samples only (0 = all; for quick runs)"})
    search_threshold: float | None = field(default=None, metadata={
        "min": 0, "max": 1,
        "help": "PersonalWAB: a search call is correct when its result score 1 - rank/len(results) exceeds this"})
    recommend_in_list: bool | None = field(default=None, metadata={
        "help": "PersonalWAB: a recommend call is a success only when the target is in its returned list (the "
                "task's default, false: any call of the recommender is, as the seed judged it)"})
    review_threshold: float | None = field(default=None, metadata={
        "min": -1, "max": 1,
        "help": "PersonalWAB: a review whose similarity to the gold review is below this is a negative"})
    positive_k: int | None = field(default=None, metadata={
        "min": 0, "help": "PersonalWAB: history items in the prompt that collects positives"})
    positive_tries: int | None = field(default=None, metadata={
        "min": 1, "help": "PersonalWAB: calls made per search/recommend sample for its positive: the first decoded "
                          "as the others (greedy by default), the rest sampled at --positive-temperature; the "
                          "best-scoring success is kept (default: the task's, 1)"})
    # The task's 0.8 (a choice, not measured): under 1 the samples stay near the model's
    # likely calls, so most remain on topic, yet they vary the query words a search
    # positive depends on; at 1 a 135M model's samples drift off the request.
    positive_temperature: float | None = field(default=None, metadata={
        "gt": 0, "help": "PersonalWAB: sampling temperature of the positive tries after the first (default: the "
                         "task's, 0.8)"})


    def not_in_fingerprint(self) -> frozenset[str]:
        # With a pool per chunk, the chunks decide which items a try sees.
        if self.others_pool == "chunk":
            return self.NOT_IN_FINGERPRINT - {"samples_per_chunk"}
        return self.NOT_IN_FINGERPRINT


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
    for kind, row in summary.get("pwab", {}).get("by_type", {}).items():
        log.info("  %s: %s tasks, positive tries %s (successes %s), positives %s, kept pairs %s", kind,
                 row["tasks"], row["positive_tries"], row["successes"], row["positives"], row["kept_pairs"])
    if summary.get("rouge_l", {}).get("quantiles"):
        log.info("[03_collect_pairs] ROUGE-L of distinct tries: %s; kept below other thresholds: %s",
                 summary["rouge_l"]["quantiles"], summary["rouge_l"]["kept_below"])


class CollectJob:
    """Stage 03 on one worker: the collecting model loaded once, the task's collector per chunk.

    A worker reads the other users' samples from the input files itself (the driver sends
    paths, not data: every worker sees the run directory).
    """

    def __init__(self, cfg: CollectPairsConfig, inputs: list[Path]):
        self.cfg, self.inputs = cfg, [Path(p).resolve() for p in inputs]
        self.collector = None
        self.tok = None

    def __getstate__(self) -> dict:  # a worker loads its own model
        return {"cfg": self.cfg, "inputs": self.inputs, "collector": None, "tok": None}

    def setup(self, users: list[str]) -> None:
        """Load the samples, the model and the collector; a second call is a no-op (the
        driver sets a one-worker job up before it writes)."""
        if self.collector is not None:
            return
        # train.jsonl was checked non-empty by the driver; remain_train may hold nothing
        other_samples = [s for path in self.inputs for s in load_samples(path, allow_empty=True)]
        task = task_of(self.cfg)
        model, self.tok = load_model(self.cfg.collect_model or self.cfg.model, self.cfg.device, self.cfg.dtype,
                                     layers_attr=self.cfg.layers_attr)
        self.collector = COLLECTORS[task.pair_collector](self.cfg, task, other_samples, model, self.tok)

    def run(self, chunk) -> tuple[list[dict], list[dict]]:
        """The pairs and done-markers of a chunk's samples."""
        return self.collector.chunk(chunk.items)


def _inputs(cfg: CollectPairsConfig, task) -> tuple[list[Path], list[Path]]:
    """Every file stage 03 reads: the training samples (then remain_train: other users'
    items), and the files of the task's setup stages its judge uses (PersonalWAB's SASRec)."""
    ranked = stage_dir(cfg.run_dir, "ranked")
    train_path, remain_path = ranked / "train.jsonl", ranked / "remain_train.jsonl"
    if not train_path.exists():
        raise FileNotFoundError(f"{train_path}: run scripts.02_rank_history first")
    if not remain_path.exists():
        log.warning("%s missing: other users' items come from train.jsonl only", remain_path)
    setup = [p for p in setup_files(cfg.run_dir, task) if p.exists()]
    return [p for p in (train_path, remain_path) if p.exists()], setup


def run(cfg: CollectPairsConfig) -> dict[str, Any] | None:
    """Collect (or resume) the pairs; return the manifest (None when the stage had finished)."""
    cfg = with_task_defaults(cfg)
    task = task_of(cfg)
    require(cfg, "history_k", "max_new_tokens")
    choose("pair collector", task.pair_collector, COLLECTORS)
    sample_files, setup = _inputs(cfg, task)
    model_dir = cfg.collect_model or cfg.model
    stage = Stage(cfg.STAGE, stage_dir(cfg.run_dir, "pairs"), cfg, overwrite=cfg.overwrite,
                  inputs=[*sample_files, *setup], model=model_dir)
    if stage.done:
        return None
    samples = load_samples(sample_files[0])
    samples = samples[:cfg.max_samples] if cfg.max_samples else samples
    # Other users' items (every training sample, also past --max-samples, and remain_train):
    # read by each worker from these files.
    job = CollectJob(absolute_paths(cfg), sample_files)
    if cfg.workers == 1:  # the model is checked before anything is written
        job.setup([])
        tok = job.tok
    else:  # the workers load the model; here the tokenizer (checks the model directory)
        tok = load_tokenizer(model_dir)
    prompts_cut = count_cut_inputs(task, samples, tok, cfg.max_prompt_tokens, cfg.STAGE)
    writer = PairWriter(stage.start())
    try:
        todo = unfinished(user_chunks(samples, lambda s: s["user_id"], cfg.samples_per_chunk), writer.done_ids)
        done = len(samples) - sum(len(c.items) for c in todo)
        for _, (pairs, markers) in run_chunks(job, todo, cfg, desc="03 collect pairs", total=len(samples), done=done):
            writer.add(pairs, markers)
    finally:
        writer.close()
    ids = [s["id"] for s in samples]
    write_in_order(writer.pairs_path, ids, "sample_id")
    write_in_order(writer.progress_path, ids, "sample_id")
    # The done-markers of every run (a resumed one too) give the counts.
    summary = {**COLLECTORS[task.pair_collector].summarize(writer.markers(), {s["user_id"] for s in samples}),
               "prompts_cut": prompts_cut}
    summary_path = stage.out_dir / "summary.json"
    write_json(summary_path, summary)
    _report(summary)
    return stage.finish(outputs=[writer.pairs_path, writer.progress_path, summary_path],
                        model=Path(model_dir).name, seed=cfg.seed, collect_model=str(model_dir),
                        totals=summary.get("totals"), users_without_pairs=summary.get("users_without_pairs"),
                        prompts_cut=prompts_cut)
