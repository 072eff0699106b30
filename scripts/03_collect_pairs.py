"""Stage 03: collect contrast pairs (gold output vs. an answer written without the user).

Usage:
    python -m scripts.03_collect_pairs --config configs/lamp4.json [--num-neg-per-user 2] [--k 5]
        [--rag others|history] [--threshold 0.15] [--collect-model models/other] [--max-samples 8]

Reads {run_dir}/ranked/train.jsonl (and remain_train.jsonl for other users' items) and
writes {run_dir}/pairs/pairs.jsonl, progress.jsonl (per-sample done-markers: a killed
run resumes where it stopped), summary.json and manifest.json (last).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from collect import generation
from collect.pairs import CollectPairsConfig, PairSettings, PairWriter, collect_pairs, summarize
from data_process.artifacts import Stage, read_jsonl, write_json
from data_process.config import parse_config, stage_dir
from data_process.schema import validate_sample
from steering.model import load_model, model_name

log = logging.getLogger("03_collect_pairs")


def load_samples(path: Path) -> list[dict]:
    """Read and validate one ranked split."""
    return [validate_sample(r, f"{path}:{i + 1}") for i, r in enumerate(read_jsonl(path))]


def report(summary: dict) -> None:
    totals = summary["totals"]
    dropped = ", ".join(f"{k[len('dropped_'):]} {v}" for k, v in totals.items() if k.startswith("dropped_"))
    print(f"[03_collect_pairs] samples {totals.get('samples', 0)}  tries {totals.get('tries', 0)}  "
          f"kept {totals.get('kept', 0)}  dropped: {dropped}")
    for user, row in summary["per_user"].items():
        print(f"  {user}: {row.get('samples', 0)} samples, kept {row.get('kept', 0)}/{row.get('tries', 0)}")
    if summary["users_without_pairs"]:
        print(f"[03_collect_pairs] WARNING: {len(summary['users_without_pairs'])} user(s) without pairs: "
              + ", ".join(summary["users_without_pairs"]))
    if summary.get("rouge_l", {}).get("quantiles"):
        print(f"[03_collect_pairs] ROUGE-L of distinct tries: {summary['rouge_l']['quantiles']}; "
              f"kept below other thresholds: {summary['rouge_l']['kept_below']}")
    if summary.get("malformed"):
        print(f"[03_collect_pairs] malformed generations: {summary['malformed']}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(CollectPairsConfig, "collect_pairs", argv)
    stage = Stage("03_collect_pairs", stage_dir(cfg.run_dir, "pairs"), cfg, overwrite=cfg.overwrite)
    if stage.done:
        return
    ranked = stage_dir(cfg.run_dir, "ranked")
    train_path, remain_path = ranked / "train.jsonl", ranked / "remain_train.jsonl"
    if not train_path.exists():
        raise FileNotFoundError(f"{train_path}: run scripts.02_rank_history first")
    samples = load_samples(train_path)
    if cfg.max_samples:
        samples = samples[:cfg.max_samples]
    inputs = [train_path]
    other_samples = load_samples(train_path)  # every user's samples, also past --max-samples
    if remain_path.exists():
        other_samples += load_samples(remain_path)
        inputs.append(remain_path)
    else:
        log.warning("%s missing: other users' items come from train.jsonl only", remain_path)

    model_dir = cfg.collect_model or cfg.model
    model, tok = load_model(model_dir, cfg.device, cfg.dtype)
    writer = PairWriter(stage.out_dir)
    generation.reset_malformed()
    try:
        if cfg.task == "pwab":
            from collect.pwab_pairs import collect_pwab_pairs  # PersonalWAB helper's module

            summary = collect_pwab_pairs(cfg, samples, other_samples, model, tok, writer, writer.done_ids)
        else:
            generator = functools.partial(
                generation.generate, model, tok, max_new_tokens=cfg.resolved_max_new_tokens(),
                batch_size=cfg.batch_size, do_sample=cfg.do_sample, temperature=cfg.temperature,
                top_p=cfg.top_p, seed=cfg.seed, form="raw", desc="generate negatives")
            summary = collect_pairs(samples, other_samples, generator, PairSettings.from_config(cfg),
                                    writer, tokenizer=tok)
    finally:
        writer.close()
    # The done-markers give every summary key, whatever the collector itself returned.
    summary = {**summarize(read_jsonl(writer.progress_path), {s["user_id"] for s in samples}), **(summary or {})}
    summary["malformed"] = dict(generation.MALFORMED)
    summary_path = stage.out_dir / "summary.json"
    write_json(summary_path, summary)
    report(summary)
    stage.finish(inputs=inputs, outputs=[writer.pairs_path, writer.progress_path, summary_path],
                 model=model_name(model), seed=cfg.seed, collect_model=str(model_dir),
                 totals=summary.get("totals"), users_without_pairs=summary.get("users_without_pairs"))


if __name__ == "__main__":
    main()
