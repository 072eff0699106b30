"""Cost of per-user LoRA training on the real model (a benchmark, not a test): prints ratios.

    python -m benchmarks.bench_lora --samples runs/demo/ranked/train.jsonl --threads 1

(a) one training step (forward + backward + AdamW, batch 4) with the LM head on the
    answer positions only (steering.lora) vs on every position, as a plain
    ``model(labels=...)`` call does; same examples, same loss up to float error;
(b) padding: the share of pad tokens in batches of 4 when a user's examples are cut in
    random order vs length-grouped (steering.lora.length_grouped_batches), over every
    user of the split -- exact counts, no timing.
Examples are the RAG prompts generation writes (``--history-k`` items in
``--max-prompt-tokens``).  Times are the best of ``--repeats`` interleaved runs, so a
noisy shared machine hurts both sides alike.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from data_process.artifact_io import read_jsonl
from steering.algorithms import AlgoSettings, build_algorithm
from steering.loading import load_model
from steering.lora import LoraRecipe, answer_loss, collate, encode_example, length_grouped_batches
from tasks import get_task

ROOT = Path(__file__).resolve().parent.parent


def _examples(tok, samples: list[dict], task: str, history_k: int, budget: int):
    algo = build_algorithm("rag", AlgoSettings(task=get_task(task), tokenizer=tok, history_k=history_k,
                                               max_prompt_tokens=budget))
    return [encode_example(tok, m, s["output"], 128) for m, s in zip(algo(samples).messages, samples, strict=True)]


def _step(wrapped, optimizer, batch, answer_only: bool) -> float:
    if answer_only:
        loss_sum, n = answer_loss(wrapped, batch)
        loss = loss_sum / n
    else:
        loss = wrapped(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--samples", default=str(ROOT / "runs" / "demo" / "ranked" / "train.jsonl"))
    parser.add_argument("--task", default="lamp4")
    parser.add_argument("--history-k", type=int, default=3)
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import get_peft_model

    samples = read_jsonl(args.samples)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    examples = _examples(tok, samples, args.task, args.history_k, args.max_prompt_tokens)
    print(f"{len(examples)} examples from {args.samples}; torch threads: {torch.get_num_threads()}")

    batch = collate(examples[:4], tok.pad_token_id, "cpu")
    wrapped = get_peft_model(model, LoraRecipe().peft_config())
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.0)  # lr 0: same weights
    times = {True: [], False: []}
    losses = {}
    for _ in range(args.repeats):
        for answer_only in (True, False):
            start = time.perf_counter()
            losses[answer_only] = _step(wrapped, optimizer, batch, answer_only)
            times[answer_only].append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    print(f"(a) training step, batch 4 ({tokens} tokens): answer-only head {min(times[True]):.2f} s, "
          f"full head {min(times[False]):.2f} s -> {min(times[False]) / min(times[True]):.2f}x faster; "
          f"loss {losses[True]:.5f} vs {losses[False]:.5f}")

    by_user: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_user.setdefault(s["user_id"], []).append(i)
    shares = {"random": [], "grouped": []}
    for rows in by_user.values():
        lengths = [len(examples[i].ids) for i in rows]
        order = list(range(len(rows)))
        random.Random(0).shuffle(order)
        shares["random"].append((lengths, [order[j:j + 4] for j in range(0, len(order), 4)]))
        shares["grouped"].append((lengths, length_grouped_batches(lengths, 4, random.Random(0))))
    for name, parts in shares.items():
        padded = sum(len(b) * max(ls[i] for i in b) for ls, bs in parts for b in bs)
        real = sum(sum(ls) for ls, _ in parts)
        print(f"(b) {name:7s} batches of 4: {1 - real / padded:.1%} of the tokens are padding ({padded} in all)")


if __name__ == "__main__":
    main()
