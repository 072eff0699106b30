"""Where a long answer's time goes: prefill and decode cost per dtype and batch size.

    python -m benchmarks.bench_decode --dtypes float32 bfloat16 --batch-sizes 1 8 32 --threads 1

For each dtype and batch size (all in one run, so a noisy shared machine hurts every row
alike) it runs one batch of ``--context`` prompt tokens through the model, then
``--steps`` decode steps with the key/value cache, and prints prefill tokens per second
and decode milliseconds per step and per row-step.  A 135M model decoding on a CPU reads
all its weights for every step, so a step costs nearly the same for 1 row as for 8: the
rows of a batch share that read, and a dtype with half the bytes (bf16, on a CPU with bf16
matrix units such as AMX) halves it.  Stage 03 and 05 on LongLaMP (256 new tokens per
answer) spend most of their time here; ``configs/longlamp.json`` sets its batch size and
dtype by this table.  The prompt tokens are random ids: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from steering.loading import load_model


@torch.no_grad()
def measure(model, batch_size: int, context: int, steps: int, vocab: int) -> dict:
    """One batch: prefill ``context`` tokens per row, then ``steps`` greedy decode steps."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (batch_size, context), generator=generator)
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    logits = model(input_ids=ids, cache=cache, use_cache=True).logits
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    step = (time.perf_counter() - start) / steps
    return {"batch_size": batch_size, "prefill_tokens_per_s": round(batch_size * context / prefill, 1),
            "decode_ms_per_step": round(1000 * step, 1), "decode_ms_per_row_step": round(1000 * step / batch_size, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 16, 32])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned: say how many you used)")
    parser.add_argument("--context", type=int, default=700, help="prompt tokens per row (LongLaMP: ~700)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per row")
    parser.add_argument("--out", default="", help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtypes:
        model, tok = load_model(args.model, "cpu", dtype)
        measure(model, 1, 16, 2, len(tok))  # warm-up: first calls allocate and pick kernels
        for b in args.batch_sizes:
            rows.append({"dtype": dtype, **measure(model, b, args.context, args.steps, len(tok))})
        del model
    base = {r["batch_size"]: r for r in rows if r["dtype"] == args.dtypes[0]}
    first = rows[0]["decode_ms_per_row_step"]
    print(f"{Path(args.model).name}, {args.context} prompt tokens, {args.steps} decode steps, "
          f"{args.threads} thread(s)")
    print(f"| dtype | batch | prefill tok/s | decode ms/step | ms/row-step | decode x {args.dtypes[0]} same batch "
          f"| decode x {rows[0]['dtype']} batch {rows[0]['batch_size']} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = base[r["batch_size"]]["decode_ms_per_row_step"] / r["decode_ms_per_row_step"]
        print(f"| {r['dtype']} | {r['batch_size']} | {r['prefill_tokens_per_s']:.0f} | {r['decode_ms_per_step']:.0f} "
              f"| {r['decode_ms_per_row_step']:.1f} | {same:.2f} | {first / r['decode_ms_per_row_step']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
