"""Train the SASRec recommender behind PersonalWAB's get_recommendations_by_history.

Reads every user's behaviours (user_history_part_*.json in data_dir, time order) and
writes {run_dir}/pwab_env/sasrec/{model.safetensors, config.json, manifest.json}, where
05_generate / 06_evaluate and 03_collect_pairs find it (their PersonalWAB cache dir is
{run_dir}/pwab_env).  Like PersonalWAB's own recommender it is part of the environment,
trained on all behaviours.  Seeded; logs the loss per epoch and the training time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_process.stage import Stage
from eval.pwab_env import default_cache_dir, numbered_parts
from eval.sasrec import CONFIG, WEIGHTS, SASRecConfig, save_sasrec
from stages.common import ON_ERROR, StageConfig, task_of
from steering.loading import resolve_device
from tasks import Task
from tasks.pwab_data import user_sequences
from train.sasrec import train_sasrec

log = logging.getLogger(__name__)


@dataclass
class TrainSasrecConfig(StageConfig):
    """Settings of the SASRec training (config section ``train_sasrec``)."""

    STAGE = "train_sasrec"
    SECTIONS = ("train_sasrec",)

    out_dir: str = field(default="", metadata={"help": "checkpoint directory (default {run_dir}/pwab_env/sasrec)"})
    hidden: int = field(default=64, metadata={"min": 1, "help": "embedding and hidden size"})
    blocks: int = field(default=2, metadata={"min": 1, "help": "self-attention blocks"})
    heads: int = field(default=2, metadata={"min": 1, "help": "attention heads (must divide hidden)"})
    max_len: int = field(default=50, metadata={"min": 1, "help": "longest input sequence (older items are cut)"})
    dropout: float = field(default=0.2, metadata={"min": 0, "lt": 1, "help": "dropout rate"})
    epochs: int = field(default=200, metadata={"min": 1, "help": "passes over all user sequences"})
    batch_size: int = field(default=128, metadata={"min": 1, "help": "user sequences per step"})
    lr: float = field(default=1e-3, metadata={"gt": 0, "help": "Adam learning rate"})
    threads: int = field(default=0, metadata={
        "min": 0, "help": "CPU threads for torch (0 = torch's default; "
                          "1 is fastest for small models on a busy machine)"})
    on_error: str = field(default="stop", metadata={"help": "what a bad history record does", "choices": ON_ERROR})


def setup_files(run_dir: str | Path, task: Task) -> list[Path]:
    """The files of ``task``'s setup stages that the stages after them read (inputs they
    fingerprint): the SASRec checkpoint where PersonalWAB's tool environment finds it."""
    if TrainSasrecConfig.STAGE not in task.setup_stages:
        return []
    sasrec = default_cache_dir(run_dir) / "sasrec"
    return [sasrec / WEIGHTS, sasrec / CONFIG]


def run(cfg: TrainSasrecConfig) -> dict[str, Any]:
    """Train and save the recommender; return the manifest ({} when the stage had finished)."""
    if cfg.STAGE not in task_of(cfg).setup_stages:
        raise ValueError(f"train_sasrec builds PersonalWAB's recommender; task {cfg.task!r} does not use it")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else default_cache_dir(cfg.run_dir) / "sasrec"
    inputs = numbered_parts(Path(cfg.data_dir), "user_history")  # every user's behaviours
    stage = Stage(cfg.STAGE, out_dir, cfg, overwrite=cfg.overwrite, inputs=inputs)
    if stage.done:
        return {}
    sequences = user_sequences(cfg.data_dir, cfg.on_error)
    lengths = sorted(len(s) for s in sequences.values())
    log.info("[train_sasrec] %d users, %d items, %d behaviours (median %d per user)", len(sequences),
             len({a for s in sequences.values() for a in s}), sum(lengths), lengths[len(lengths) // 2])
    device = str(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    model, item_ids, losses = train_sasrec(
        list(sequences.values()),
        SASRecConfig(num_items=0, hidden=cfg.hidden, blocks=cfg.blocks, heads=cfg.heads,
                     max_len=cfg.max_len, dropout=cfg.dropout),
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device=device)
    seconds = round(time.perf_counter() - start, 2)
    curve = [round(x, 4) for x in losses]
    out_dir = stage.start()
    save_sasrec(model, item_ids, out_dir, losses=curve, seconds=seconds, users=len(sequences))
    shown = curve if len(curve) <= 12 else curve[:6] + ["..."] + curve[-5:]
    log.info("[train_sasrec] loss per epoch: %s", shown)
    log.info("[train_sasrec] trained in %s s on %s; wrote %s", seconds, device, out_dir)
    return stage.finish(outputs=[out_dir / WEIGHTS, out_dir / CONFIG], seed=cfg.seed,
                        losses=curve, train_seconds=seconds, items=len(item_ids), users=len(sequences))
