"""Steering cost on the real model (a benchmark, not a test): prints its ratios.

    python -m benchmarks.bench_steering --vectors runs/lamp4/vectors --threads 1

(--threads 1 on a machine other jobs share: two torch threads that wait on each other
under load make every forward call slow, which swamps what is being measured.)

(a) steered vs plain batched generation, same prompts, batch size and number of tokens
    (goal: ratio <= 1.05);
(b) steered generation of 32 queries from mixed users at batch 16 vs one query at a
    time, through steering.generation.generate (goal: >= 2.5x throughput), and whether
    the batched outputs equal the one-at-a-time outputs;
(c) extraction cost per pair vs a plain batched forward over the same tokens (goal
    <= 1.1x), and batched extraction vs one pair at a time.
Vectors come from a stage-04 directory when given (per-query aggregates of real pairs),
else random vectors of a typical size.  Times are the best of ``--repeats`` runs,
interleaved, so a noisy shared machine hurts both sides alike.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from data_process.artifact_io import read_jsonl
from steering.extract import encode_pair, extract_pairs
from steering.hooks import StopForward, add_vectors, stop_after_layer
from steering.inputs import chat_prompt
from steering.loading import load_model
from tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
KEYS = ["attn.15", "mlp.15"]


def _samples(path: Path, n: int, words: int) -> list[dict]:
    """``n`` samples spread over users, articles cut to ``words`` words to keep runs short."""
    by_user: dict[str, list[dict]] = {}
    for s in read_jsonl(path):
        by_user.setdefault(s["user_id"], []).append(s)
    rows = [s for turn in range(max(map(len, by_user.values()))) for _, ss in sorted(by_user.items())
            if turn < len(ss) for s in [ss[turn]]][:n]  # round-robin: neighbours are different users
    return [{**s, "input": " ".join(s["input"].split()[:words])} for s in rows]


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _deltas(samples, vectors_dir: str, model) -> dict[str, torch.Tensor]:
    if vectors_dir and (Path(vectors_dir) / "vectors.safetensors").exists():
        from steering.aggregate import PairAggregator
        from steering.vectors import VectorStore

        store = VectorStore.load(vectors_dir, model=model, keys=KEYS)
        agg = PairAggregator(store, KEYS, top_pairs=5)
        out = agg.vectors([s["user_id"] for s in samples], [s["input"] for s in samples])
        print(f"vectors: per-query aggregates from {vectors_dir} ({len(agg.missing_users)} users without pairs)")
        return out
    gen = torch.Generator().manual_seed(0)
    print("vectors: random (norm 4)")
    shape = (len(samples), model.config.hidden_size)
    return {k: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1) * 4 for k in KEYS}


def bench_overhead(model, tok, messages, deltas, new_tokens: int, repeats: int) -> None:
    enc = tok([chat_prompt(tok, m) for m in messages], return_tensors="pt", padding=True, add_special_tokens=False)
    # Fixed length (min == max) so both sides decode exactly the same number of steps.
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)

    def plain():
        model.generate(**enc, **kw)

    def steered():
        with add_vectors(model, deltas, positions="all"):
            model.generate(**enc, **kw)

    plain()  # warm-up
    t_plain, t_steer = [], []
    for r in range(repeats):  # interleaved, alternating order, so machine noise hits both alike
        for name in (("plain", "steered") if r % 2 == 0 else ("steered", "plain")):
            (t_plain if name == "plain" else t_steer).append(_best(plain if name == "plain" else steered, 1))
    per_round = sorted(s / p for p, s in zip(t_plain, t_steer, strict=True))
    print(f"(a) batched generation, {len(messages)} prompts x {new_tokens} tokens, {repeats} rounds: plain best "
          f"{min(t_plain):.2f}s, steered best {min(t_steer):.2f}s, ratio of bests {min(t_steer) / min(t_plain):.3f}, "
          f"median per-round ratio {per_round[len(per_round) // 2]:.3f} (goal <= 1.05)")


@torch.inference_mode()
def bench_decode_step(model, tok, messages, deltas, repeats: int = 30) -> None:
    """One KV-cached decode step of a batch, plain vs steered, interleaved ``repeats`` times:
    isolates the hooks' per-token cost from the run-to-run noise of whole generations."""
    enc = tok([chat_prompt(tok, m) for m in messages], return_tensors="pt", padding=True, add_special_tokens=False)
    out = model(**enc, use_cache=True)
    cache = out.cache
    step = dict(input_ids=out.logits[:, -1:].argmax(-1),
                attention_mask=torch.cat([enc["attention_mask"], torch.ones_like(enc["attention_mask"][:, :1])], 1),
                position_ids=enc["attention_mask"].sum(1, keepdim=True))

    def plain():
        model(**step, cache=cache, use_cache=True)
        cache.crop(-1)  # drop the new token: every step is the same work

    def steered():
        with add_vectors(model, deltas, positions="all"):
            plain()

    t_plain, t_steer = [], []
    for _ in range(repeats):
        t_plain.append(_best(plain, 1))
        t_steer.append(_best(steered, 1))
    p, s = sorted(t_plain)[repeats // 2], sorted(t_steer)[repeats // 2]
    print(f"(a') one cached decode step, batch {len(messages)}: plain median {1000 * p:.1f} ms, steered median "
          f"{1000 * s:.1f} ms, ratio {s / p:.3f}; best {1000 * min(t_plain):.1f} vs {1000 * min(t_steer):.1f} ms")


def bench_batching(model, tok, messages, deltas, new_tokens: int) -> None:
    from steering.generation import generate

    start = time.perf_counter()
    batched = generate(model, tok, messages, max_new_tokens=new_tokens, batch_size=16, deltas=deltas)
    t_batch = time.perf_counter() - start
    start = time.perf_counter()
    alone = [generate(model, tok, [m], max_new_tokens=new_tokens, batch_size=1,
                      deltas={k: v[i:i + 1] for k, v in deltas.items()})[0] for i, m in enumerate(messages)]
    t_alone = time.perf_counter() - start
    same = sum(a == b for a, b in zip(batched, alone, strict=True))
    print(f"(b) {len(messages)} steered queries, mixed users: batch 16 {t_batch:.2f}s, one at a time "
          f"{t_alone:.2f}s, throughput x{t_alone / t_batch:.2f} (goal >= 2.5); "
          f"identical outputs {same}/{len(messages)}")


def bench_extraction(model, tok, pairs, repeats: int) -> None:
    seqs = sorted((s for p in pairs for s in encode_pair(tok, p, 64)), key=lambda s: -len(s.ids))
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s.ids):] = torch.tensor(s.ids)
        mask[i, width - len(s.ids):] = 1

    @torch.inference_mode()
    def forward_all(stop: bool):  # the same tokens in the same length-sorted batches, no read hooks
        for start in range(0, len(seqs), 16):
            try:
                model(input_ids=ids[start:start + 16], attention_mask=mask[start:start + 16], use_cache=False)
            except StopForward:
                pass

    def plain():
        forward_all(False)

    def plain_to_layer():  # stopped after layer 15 like extraction: isolates the read hooks' cost
        with stop_after_layer(model, 15):
            forward_all(True)

    def batched():
        extract_pairs(model, tok, pairs, KEYS + ["block.15"], batch_size=16, progress=False)

    def one_by_one():
        for p in pairs:
            extract_pairs(model, tok, [p], KEYS + ["block.15"], batch_size=2, progress=False)

    t_plain, t_half, t_ext = [], [], []
    for _ in range(repeats):  # interleaved so machine noise hits all three alike
        t_plain.append(_best(plain, 1))
        t_half.append(_best(plain_to_layer, 1))
        t_ext.append(_best(batched, 1))
    t_plain, t_half, t_ext = min(t_plain), min(t_half), min(t_ext)
    t_one = _best(one_by_one, 1)
    n = len(pairs)
    ms = lambda t: f"{1000 * t / n:.0f} ms/pair"  # noqa: E731
    print(f"(c) extraction of {n} pairs (3 keys at layer 15): {ms(t_ext)}; plain batched forward over the same "
          f"tokens {ms(t_plain)}, ratio {t_ext / t_plain:.3f} (goal <= 1.1); vs the same forward stopped after "
          f"layer 15 {ms(t_half)}, ratio {t_ext / t_half:.3f}; one pair at a time {ms(t_one)}, "
          f"batched speed-up x{t_one / t_ext:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--samples", default=str(ROOT / "runs" / "lamp4" / "data" / "train.jsonl"))
    ap.add_argument("--vectors", default="", help="stage-04 vectors directory (else random vectors)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--parts", default="abc", help="which parts to run: any of a, b, c")
    ap.add_argument("--words", type=int, default=24, help="articles are cut to this many words")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    samples = _samples(Path(args.samples), 32, words=args.words)
    messages = [get_task("lamp4").prompt(s, []) for s in samples]
    deltas = _deltas(samples, args.vectors, model)
    first16 = {k: v[:16] for k, v in deltas.items()}
    if "a" in args.parts:
        bench_decode_step(model, tok, messages[:16], first16)
        bench_overhead(model, tok, messages[:16], first16, args.new_tokens, args.repeats)
    if "b" in args.parts:
        bench_batching(model, tok, messages, deltas, args.new_tokens)
    if "c" not in args.parts:
        return
    pairs = [{"pair_id": s["id"], "user_id": s["user_id"], "sample_id": s["id"], "prompt": m,
              "chosen": s["output"], "rejected": samples[(i + 1) % len(samples)]["output"]}
             for i, (s, m) in enumerate(zip(samples[:16], messages, strict=False))]
    bench_extraction(model, tok, pairs[:12], max(2, args.repeats // 2))


if __name__ == "__main__":
    main()
