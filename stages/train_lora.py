"""Train one LoRA adapter per seen user on that user's training samples (the OPPU baseline).

Reads {run_dir}/ranked/train.jsonl (stage 02) and writes {run_dir}/lora/<user_id>/ (PEFT
format, safetensors), the directory ``05_generate --algo oppu`` / ``oppu+fints`` (or
``--plugin``) loads.  The prompt of an example is one generation writes (``--prompt rag``:
the task's top ``--history-k`` ranked items, or ``zeroshot``), by default the task's
``lora_prompt`` (zero-shot for LaMP and LongLaMP, RAG for PersonalWAB, as OPPU's
checkpoints were trained); 05 runs the adapters under the RAG prompt either way.  The
loss covers the answer only; OPPU's recipe is the default.  ``--base`` first trains one
shared adapter on ``remain_train`` (the other users) and starts every user from it, as
OPPU does.

Resumable: each finished user is a line of progress.jsonl written after its adapter, so a
killed run continues with the next unfinished user (a half-trained user starts over).
Seeded per user.  The manifest lists every user's losses, seconds and tokens per
optimizer step (padded, and without the padding).  Only the ``train`` split is read; a
training sample that is, or shows in its history, a test sample or a user's test gold is
an error.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data_process.artifact_io import JsonlWriter, read_json, read_jsonl, write_json
from data_process.config import stage_dir
from data_process.progress import tqdm
from data_process.schema import checked_name
from data_process.stage import Stage
from stages.common import (
    PromptSettings,
    StageConfig,
    finished_input,
    load_samples,
    require,
    task_of,
    with_task_defaults,
)
from steering.algorithms import AlgoSettings, build_algorithm
from steering.loading import load_model, model_name
from steering.lora import LoraRecipe, encode_example, mean_loss, save_adapter, step_tokens, train_adapter

log = logging.getLogger(__name__)

PROMPTS = ["rag", "zeroshot"]  # the generation algorithms whose prompt an adapter can learn
TASK_PROMPT = "lora_prompt"  # the key of a task's ``defaults`` that chooses --prompt (rag without one)
PROGRESS = "progress.jsonl"


@dataclass
class TrainLoraConfig(StageConfig, PromptSettings):
    """Settings of per-user LoRA training (config sections ``prompt``, then ``train_lora``):
    the prompt settings are 05's, so the adapters learn the prompts 05's ``--prompt`` algorithm
    writes (default: the task's ``lora_prompt``)."""

    STAGE = "train_lora"
    SECTIONS = ("prompt", "train_lora")

    out_dir: str = field(default="", metadata={"help": "adapter directory (default {run_dir}/lora)"})
    prompt: str | None = field(default=None, metadata={
        "help": "prompt of the examples: the one this generation algorithm writes (default: the task's; "
                "zeroshot for LaMP and LongLaMP, rag for PersonalWAB)", "choices": PROMPTS})
    max_answer_tokens: int = field(default=128,
                                   metadata={"min": 1, "help": "answer tokens trained on (longer answers are cut)"})
    rank: int = field(default=8, metadata={"min": 1, "help": "LoRA rank r"})
    lora_alpha: float = field(default=8.0, metadata={"gt": 0, "help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"min": 0, "lt": 1, "help": "dropout on the LoRA input"})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"],
                                      metadata={"non_empty": True, "help": "module names that get adapters"})
    lr: float = field(default=1e-4, metadata={"gt": 0, "help": "AdamW learning rate (constant, no weight decay)"})
    epochs: int = field(default=2, metadata={"min": 1, "help": "passes over each user's samples"})
    batch_size: int = field(default=4, metadata={"min": 1, "help": "examples per optimisation step"})
    base: bool = field(default=False, metadata={"help": "first train a shared adapter on remain_train and start "
                                                        "every user from it (OPPU's first step)"})
    base_limit: int = field(default=0,
                            metadata={"min": 0, "help": "--base: only the first N remain_train samples (0: all)"})
    threads: int = field(default=0, metadata={"min": 0, "help": "CPU threads for torch (0 = torch's default)"})


def adapter_dir(cfg: Any) -> Path:
    """Where the per-user adapters live: ``--out-dir`` or {run_dir}/lora."""
    return Path(cfg.out_dir) if cfg.out_dir else stage_dir(cfg.run_dir, "lora")


def run(cfg: TrainLoraConfig) -> dict[str, Any]:
    """Train (or resume) every seen user's adapter; return the manifest ({} when already finished)."""
    cfg = with_prompt(with_task_defaults(cfg))  # the resolved prompt is what the fingerprint holds
    task = task_of(cfg)
    require(cfg, "history_k")
    out = adapter_dir(cfg)
    ranked = finished_input(cfg.run_dir, "ranked", "02_rank_history")
    source = ranked / "train.jsonl"
    # The test splits decide which training samples are skipped (see _without_test_leaks).
    inputs = [source, *([ranked / "remain_train.jsonl"] if cfg.base else []), *sorted(ranked.glob("*test*.jsonl"))]
    stage = Stage(cfg.STAGE, out, cfg, overwrite=cfg.overwrite, inputs=inputs)
    if stage.done:
        return {}
    samples = _without_test_leaks(load_samples(source), source, ranked)
    by_user: dict[str, list[dict]] = {}
    for s in samples:
        by_user.setdefault(checked_name(s["user_id"], str(source)), []).append(s)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model, cfg.device, cfg.dtype, layers_attr=cfg.layers_attr)
    out = stage.start()
    pad_id = tok.pad_token_id
    recipe = LoraRecipe(r=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.target_modules, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size)
    encode = _encoder(cfg, task, tok)
    base = _train_base(cfg, model, recipe, encode, pad_id, ranked) if cfg.base else None
    with JsonlWriter(out / PROGRESS) as writer:
        done = {r["user_id"] for r in writer.existing if (out / r["user_id"] / "adapter_config.json").exists()}
        log.info("[train_lora] %d users, %d samples (%d users already trained) -> %s",
                 len(by_user), len(samples), len(done), out)
        for user in tqdm([u for u in by_user if u not in done], desc="train_lora", unit="user"):
            start = time.perf_counter()
            examples = encode(by_user[user])
            before = mean_loss(model, examples, pad_id)
            wrapped, epochs, tokens = train_adapter(model, examples, recipe, pad_id,
                                                    seed=_user_seed(cfg.seed, user), init_from=base, desc=user)
            after = mean_loss(wrapped, examples, pad_id)
            model = save_adapter(wrapped, out / user)
            writer.write({"user_id": user, "n_samples": len(examples), "loss_before": round(before, 4),
                          "loss_after": round(after, 4), "epoch_losses": [round(x, 4) for x in epochs],
                          "seconds": round(time.perf_counter() - start, 2), **tokens})
    rows = {r["user_id"]: r for r in read_jsonl(out / PROGRESS)}  # a retrained user's last line wins
    return _finish(stage, cfg, model, out, rows, base)


def with_prompt(cfg: TrainLoraConfig) -> TrainLoraConfig:
    """``cfg`` with ``prompt`` set: as given, else the task's ``lora_prompt``, else rag."""
    if cfg.prompt is not None:
        return cfg
    return replace(cfg, prompt=task_of(cfg).defaults.get(TASK_PROMPT, "rag"))


def _encoder(cfg: TrainLoraConfig, task, tok):
    """samples -> training examples whose prompts are the ones generation writes."""
    algo = build_algorithm(cfg.prompt, AlgoSettings(task=task, tokenizer=tok, history_k=cfg.history_k,
                                                    max_prompt_tokens=cfg.max_prompt_tokens))

    def encode(samples: list[dict]):
        messages = algo(samples).messages
        return [encode_example(tok, m, s["output"], cfg.max_answer_tokens, task.response_prefix)
                for m, s in zip(messages, samples, strict=True)]

    return encode


def _train_base(cfg: TrainLoraConfig, model, recipe: LoraRecipe, encode, pad_id: int, ranked: Path) -> Path:
    """The shared adapter trained on remain_train (reused when a previous run saved it)."""
    base_dir = adapter_dir(cfg).with_name(adapter_dir(cfg).name + "_base")
    if (base_dir / "adapter_config.json").exists():
        log.info("[train_lora] reusing the shared base adapter %s", base_dir)
        return base_dir
    samples = load_samples(ranked / "remain_train.jsonl")
    samples = samples[: cfg.base_limit] if cfg.base_limit > 0 else samples
    start = time.perf_counter()
    wrapped, epochs, tokens = train_adapter(model, encode(samples), recipe, pad_id, seed=cfg.seed, desc="base")
    save_adapter(wrapped, base_dir)
    write_json(base_dir / "losses.json", {"n_samples": len(samples), "epoch_losses": epochs,
                                          "seconds": round(time.perf_counter() - start, 2), **tokens})
    log.info("[train_lora] base adapter on %d remain_train samples: loss per epoch %s", len(samples),
             [round(x, 4) for x in epochs])
    return base_dir


def _finish(stage: Stage, cfg: TrainLoraConfig, model, out: Path, rows: dict, base) -> dict:
    seconds = sorted(r["seconds"] for r in rows.values())
    per_user = {"mean": round(sum(seconds) / len(seconds), 2), "median": seconds[len(seconds) // 2],
                "max": seconds[-1], "total": round(sum(seconds), 2)} if seconds else None
    tokens = _tokens_per_step(rows.values())
    if seconds:
        log.info("[train_lora] %d adapters (--prompt %s); seconds per user: mean %.1f, median %.1f, max %.1f, "
                 "total %.1f; tokens per step: %s padded, %s without padding (%d steps); mean loss on the "
                 "training samples %.4f -> %.4f", len(rows), cfg.prompt, per_user["mean"], per_user["median"],
                 per_user["max"], per_user["total"], tokens["padded_tokens_per_step"], tokens["tokens_per_step"],
                 tokens["steps"], sum(r["loss_before"] for r in rows.values()) / len(rows),
                 sum(r["loss_after"] for r in rows.values()) / len(rows))
    return stage.finish(outputs=[out / PROGRESS], model=model_name(model), seed=cfg.seed,
                        prompt={"algo": cfg.prompt, "history_k": cfg.history_k,
                                "max_prompt_tokens": cfg.max_prompt_tokens,
                                **({"history_line": cfg.history_line} if cfg.history_line else {})},
                        seconds_per_user=per_user, tokens_per_step=tokens,
                        base_adapter=str(base) if base else None,
                        base=read_json(base / "losses.json") if base else None, users=rows)


def _tokens_per_step(rows) -> dict:
    """The users' tokens per optimizer step pooled over all their steps (rows of a run
    resumed from before they were counted have none and are left out)."""
    counted = [r for r in rows if "steps" in r]
    steps = sum(r["steps"] for r in counted)
    return step_tokens(steps, sum(r["padded_tokens_per_step"] * r["steps"] for r in counted),
                       sum(r["tokens_per_step"] * r["steps"] for r in counted))


def _user_seed(seed: int, user: str) -> int:
    """A user's own seed: the same whichever users ran before (a resumed run matches a fresh one)."""
    return seed + zlib.crc32(user.encode("utf-8"))


def _without_test_leaks(samples: list[dict], source: Path, ranked: Path) -> list[dict]:
    """``samples`` less those whose answer is one of the user's test golds (a warning).

    A training sample that is a test sample, or whose history holds one or a test gold,
    means a broken split: an error.  Stage 01's leakage rule already guarantees both;
    the adapters learn the answers themselves, so a leak would go unnoticed in the
    scores: check again.  A training question whose answer merely has the same text as
    a test gold is legitimate data, but training on it would teach that gold: skip it.
    """
    test_ids: set[str] = set()
    test_golds: dict[str, set[str]] = {}
    for path in sorted(ranked.glob("*test*.jsonl")):
        for s in load_samples(path, allow_empty=True):
            test_ids.add(s["id"])
            test_golds.setdefault(s["user_id"], set()).add(s["output"])
    kept, skipped = [], []
    for i, s in enumerate(samples):
        golds = test_golds.get(s["user_id"], set())
        where = f"{source}:{i + 1} (id {s['id']!r})"
        if s["id"] in test_ids:
            raise ValueError(f"{where}: field 'id' is a test sample's id; refusing to train on it")
        (skipped if s["output"] in golds else kept).append(s)
        for item in s["history"]:
            if item.get("id") in test_ids or item.get("output") in golds:
                raise ValueError(f"{where}: field 'history' holds a test sample or test gold "
                                 f"(item {item.get('id')!r}); refusing to train on it")
    if skipped:
        log.warning("[train_lora] skipped %d training sample(s) whose answer is also a test gold of their user: %s",
                    len(skipped), [s["id"] for s in skipped])
    return kept
