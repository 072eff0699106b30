"""Stage 03's cost: tries per second with other users' items drawn per sample or per chunk.

    python -m benchmarks.bench_pairs --samples runs/lamp4/ranked/train.jsonl --n 16

The same stage-03 work -- ``--n`` training samples (whole users, in file order) with their
tries -- is collected by :class:`collect.pairs.TextCollector` in each mode:

* ``sample``: other users' items drawn per sample, every prompt computed whole (the seed's
  way, and stage 03 before prefix sharing);
* ``chunk``: one draw per chunk and try, and the prefix the try's prompts share computed
  once (``--others-pool chunk``, ``share_prefix``);
* ``chunk-whole``: the chunk draw with every prompt computed whole (what the draw alone
  changes).

For every mode, batch size and thread count (all in one run, so a noisy shared machine
hurts every row alike) it prints tries per second, the prompt tokens the model computed
per try (padding and shared prefixes included) and the kept-pair rate, and the speed-up
of each row over ``sample`` at the same batch size and threads.  A row's pairs do not
depend on the batch size or threads (greedy decoding), only on the mode.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch

from collect.pairs import TextCollector, generator_for
from data_process.artifact_io import read_jsonl
from stages.collect_pairs import CollectPairsConfig
from stages.common import with_task_defaults
from steering.loading import load_model
from tasks import get_task

MODES = {"sample": ("sample", False), "chunk": ("chunk", True), "chunk-whole": ("chunk", False)}


def _first_users(samples: list[dict], n: int) -> list[dict]:
    """The first ``n`` samples, extended to the end of the last user's (a chunk holds whole users)."""
    out = samples[:n]
    return out + [s for s in samples[n:] if out and s["user_id"] == out[-1]["user_id"]]


def measure(model, tok, task, samples, others, *, mode: str, batch_size: int, threads: int, tries: int,
            max_prompt_tokens: int) -> dict:
    """One configuration: the chunk's pairs collected once, timed."""
    pool, share = MODES[mode]
    cfg = with_task_defaults(CollectPairsConfig(task=task.name, tries=tries, others_pool=pool, share_prefix=share,
                                                batch_size=batch_size, max_prompt_tokens=max_prompt_tokens,
                                                samples_per_chunk=len(samples)))
    stats: dict[str, int] = {}
    generate = functools.partial(generator_for(cfg, task, model, tok, f"{mode} b{batch_size} t{threads}"),
                                 stats=stats)
    collector = TextCollector(cfg, task, others, model, tok, generate=generate)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    pairs, markers = collector.chunk(samples)
    seconds = time.perf_counter() - start
    n_tries = sum(m["tries"] for m in markers)
    return {"mode": mode, "batch_size": batch_size, "threads": threads, "tries": n_tries,
            "seconds": round(seconds, 2), "tries_per_s": round(n_tries / seconds, 3),
            "prompt_tokens_per_try": round(stats.get("prompt_tokens", 0) / n_tries, 1),
            "kept_rate": round(len(pairs) / n_tries, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", default="runs/lamp4/ranked/train.jsonl",
                        help="stage 02's training samples (other users' items come from them and --others)")
    parser.add_argument("--others", default="", help="more samples for other users' items (default: "
                                                     "remain_train.jsonl beside --samples, if there)")
    parser.add_argument("--task", default="lamp4")
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=16, help="training samples collected per configuration")
    parser.add_argument("--tries", type=int, default=2)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    task = get_task(args.task)
    samples_path = Path(args.samples)
    others_path = Path(args.others) if args.others else samples_path.with_name("remain_train.jsonl")
    every = read_jsonl(samples_path)
    samples = _first_users(every, args.n)
    others = every + (read_jsonl(others_path) if others_path.exists() else [])
    model, tok = load_model(args.model, "cpu", "float32")
    print(f"{len(samples)} samples of {len({s['user_id'] for s in samples})} users x {args.tries} tries, "
          f"{args.task}, {Path(args.model).name}, max {args.max_prompt_tokens} prompt tokens")
    rows = [measure(model, tok, task, samples, others, mode=mode, batch_size=b, threads=t, tries=args.tries,
                    max_prompt_tokens=args.max_prompt_tokens)
            for t in args.threads for b in args.batch_sizes for mode in args.modes]
    base = {(r["batch_size"], r["threads"]): r["tries_per_s"] for r in rows if r["mode"] == "sample"}
    print("| mode | batch | threads | tries/s | x sample | prompt tokens / try | kept |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = base.get((r["batch_size"], r["threads"]))
        ratio = f"{r['tries_per_s'] / ref:.2f}" if ref else "-"
        print(f"| {r['mode']} | {r['batch_size']} | {r['threads']} | {r['tries_per_s']:.3f} | {ratio} "
              f"| {r['prompt_tokens_per_try']:.0f} | {r['kept_rate']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
