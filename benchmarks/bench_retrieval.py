"""Retrieval and vector storage at scale (a benchmark, not a test): prints its ratios.

    python -m benchmarks.bench_retrieval --threads 1

(a) pair retrieval + aggregation per query, one user with 100 / 1,000 / 10,000 pairs
    whose texts are 200-word articles, 300-word queries, keys attn.15 + mlp.15 at hidden
    576 and 4096, one query at a time and in batches of 16: the old path (rank_bm25's
    per-query loop, torch.sort, fp32 matrices) vs :class:`steering.aggregate.PairAggregator`,
    with the ratio and whether both pick the same top-K (for 4 queries) (goal: < 1 ms per query at 1,000
    pairs in batches of 16).  The user's index is built before timing (it is built once
    per user); its build time is printed too.
(b) stage 02 throughput on synthetic users with 500-item histories: rank_bm25 per sample
    vs :func:`data_process.ranking.rank_bm25`, and whether the orders agree.
(c) peak memory (max RSS growth, each in a fresh process) of steering 16 users from a
    100k-pair x 4096 x 2-key fp16 store (500 users x 200 pairs) vs loading every vector as
    fp32 the way the old store did (goal: < 100 MB for 16 users).

Texts are drawn from a Zipf-like vocabulary of 30,000 words with a fixed seed.  Times are
the best of ``--repeats`` runs of each side, a side stopping early once it has spent 3 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rank_bm25 import BM25Okapi

from data_process.ranking import item_text, rank_bm25
from data_process.text import tokenize
from steering.aggregate import PairAggregator
from steering.vectors import VectorStore, save_vectors

KEYS = ["attn.15", "mlp.15"]
VOCAB = 30_000


class Words:
    """Seeded synthetic text with a Zipf-like word distribution."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        p = 1.0 / np.arange(1, VOCAB + 1)
        self.p = p / p.sum()

    def texts(self, n: int, words: int) -> list[str]:
        ids = self.rng.choice(VOCAB, size=(n, words), p=self.p)
        return [" ".join(f"w{i}" for i in row) for row in ids]


class OldAggregator:
    """The retrieval path before the sparse index: rank_bm25 scores query by query, a
    full stable sort, the user's vectors held as fp32."""

    def __init__(self, texts: list[str], matrices: dict[str, torch.Tensor], top_k: int, temperature: float):
        self.bm25 = BM25Okapi([tokenize(t) for t in texts])
        self.matrices = {k: m.float() for k, m in matrices.items()}
        self.top_k, self.temperature = top_k, temperature

    def select(self, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.from_numpy(np.stack([np.asarray(self.bm25.get_scores(tokenize(q))) for q in queries]))
        top, order = torch.sort(scores, dim=1, descending=True, stable=True)
        return order[:, :self.top_k], torch.softmax(top[:, :self.top_k] / self.temperature, dim=1).float()

    def vectors(self, queries: list[str]) -> dict[str, torch.Tensor]:
        order, weights = self.select(queries)
        return {k: torch.einsum("qk,qkh->qh", weights, m[order]) for k, m in self.matrices.items()}


def _time(fn, repeats: int, budget_s: float = 3.0) -> float:
    """Best of ``repeats`` runs, stopping early once ``budget_s`` is spent (the slow old
    path then runs fewer times; the same rule for both sides)."""
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best


def _per_query(fn, queries: list[str], batch: int) -> None:
    for start in range(0, len(queries), batch):
        fn(queries[start:start + batch])


def _one_user(agg: PairAggregator):
    """``agg.vectors`` for a batch of queries that all come from user ``"u"``."""
    return lambda q: agg.vectors(["u"] * len(q), q)


def bench_retrieval(words: Words, sizes: list[int], hiddens: list[int], n_queries: int, repeats: int) -> None:
    print(f"(a) retrieval + aggregation, ms per query ({n_queries} queries of 300 words, top-5, softmax)")
    print(f"{'pairs':>6} {'hidden':>6} {'batch':>5} {'old ms':>9} {'new ms':>8} {'ratio':>7}  same top-K  "
          f"build old/new s")
    queries = words.texts(n_queries, 300)
    for n in sizes:
        texts = words.texts(n, 200)
        index = [{"pair_id": f"p{i}", "user_id": "u", "sample_id": f"s{i}", "prompt": "", "query": t}
                 for i, t in enumerate(texts)]
        for hidden in hiddens:
            tensors = {k: torch.randn(n, hidden).half() for k in KEYS}
            start = time.perf_counter()
            old = OldAggregator(texts, tensors, 5, 0.1)
            old_build = time.perf_counter() - start
            new = PairAggregator(VectorStore({"keys": KEYS}, index, tensors), KEYS,
                                 top_pairs=5, softmax_temperature=0.1)
            start = time.perf_counter()
            new.vectors(["u"], queries[:1])  # the user's index and vectors, built once
            new_build = time.perf_counter() - start
            same = torch.equal(old.select(queries[:4])[0], new.select("u", queries[:4])[0])
            for batch in (1, 16):
                t_old = _time(partial(_per_query, old.vectors, queries, batch), repeats)
                t_new = _time(partial(_per_query, _one_user(new), queries, batch), repeats)
                print(f"{n:>6} {hidden:>6} {batch:>5} {1e3 * t_old / n_queries:>9.2f} {1e3 * t_new / n_queries:>8.3f} "
                      f"{t_old / t_new:>6.0f}x  {str(same):>10}  {old_build:.2f}/{new_build:.2f}")


def _old_rank_bm25(samples: list[dict], query) -> list[list[int]]:
    out = []
    for s in samples:
        scores = BM25Okapi([tokenize(item_text(h)) for h in s["history"]]).get_scores(tokenize(query(s)))
        out.append(np.argsort(-np.asarray(scores), kind="stable").tolist())
    return out


def bench_stage02(words: Words, users: int, samples_per_user: int, items: int) -> None:
    samples = []
    for u in range(users):
        inputs, outputs = words.texts(items, 100), words.texts(items, 10)
        history = [{"id": f"u{u}h{i}", "input": a, "output": b}
                   for i, (a, b) in enumerate(zip(inputs, outputs, strict=True))]
        for j, query in enumerate(words.texts(samples_per_user, 300)):
            samples.append({"id": f"u{u}s{j}", "user_id": f"u{u}", "input": query, "output": "", "history": history})
    query = lambda s: s["input"]  # noqa: E731
    start = time.perf_counter()
    old = _old_rank_bm25(samples, query)
    t_old = time.perf_counter() - start
    start = time.perf_counter()
    new = [order for order, _ in rank_bm25(samples, query=query)]
    t_new = time.perf_counter() - start
    print(f"\n(b) stage 02 bm25 ranking, {len(samples)} samples ({users} users x {samples_per_user}) with "
          f"{items}-item histories, 300-word queries")
    print(f"    old {len(samples) / t_old:.1f} samples/s, new {len(samples) / t_new:.1f} samples/s: "
          f"{t_old / t_new:.1f}x; same orders: {old == new}")


_MEMORY_CHILD = """
import re, sys, torch
from pathlib import Path
from steering.aggregate import PairAggregator
from steering.vectors import VectorStore
torch.set_num_threads(1)
def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
store = VectorStore.load(sys.argv[1])
keys, mode = ["attn.15", "mlp.15"], sys.argv[2]
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
if mode == "all":
    held = {k: store.get(k) for k in keys}
else:
    agg = PairAggregator(store, keys, top_pairs=5)
    users = sorted(agg._rows)[:16]
    held = agg.vectors(users, ["w1 w2 w3"] * len(users))
print(status("VmHWM") - before)
"""


def bench_memory(words: Words, users: int, per_user: int, hidden: int, directory: Path) -> None:
    n = users * per_user
    texts = words.texts(1000, 20)  # short texts: the index is not what is measured
    index = [{"pair_id": f"p{i}", "user_id": f"u{i // per_user:04d}", "sample_id": f"s{i}", "prompt": "",
              "query": texts[i % len(texts)]} for i in range(n)]
    tensors = {k: torch.randn(n, hidden, dtype=torch.float16) for k in KEYS}
    save_vectors(directory, tensors, index, {"model": "synthetic", "hidden_size": hidden})
    del tensors
    size = (directory / "vectors.safetensors").stat().st_size / 2**20
    peaks = {}
    for mode in ("lazy", "all"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(directory), mode], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        peaks[mode] = float(out.stdout.split()[-1])
    need = 16 * per_user * hidden * len(KEYS) * 2 / 2**20
    print(f"\n(c) peak memory growth, {n:,}-pair x {hidden} x {len(KEYS)}-key fp16 store ({size:,.0f} MB on disk, "
          f"{users} users x {per_user} pairs)")
    print(f"    16 users, lazy: {peaks['lazy']:,.0f} MB (their vectors: {need:.0f} MB fp16); "
          f"every vector as fp32 (old load): {peaks['all']:,.0f} MB; {peaks['all'] / peaks['lazy']:.0f}x less")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000], help="pairs per user")
    ap.add_argument("--hiddens", type=int, nargs="+", default=[576, 4096])
    ap.add_argument("--queries", type=int, default=16, help="queries timed per setting")
    ap.add_argument("--repeats", type=int, default=20, help="best of this many runs (within a 3 s budget)")
    ap.add_argument("--memory-users", type=int, default=500, help="users in the memory benchmark's store")
    ap.add_argument("--memory-pairs", type=int, default=200, help="pairs per user in that store")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {args.threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          "rank_bm25 (old) vs scipy-sparse BM25 + torch top-K (new)\n")
    words = Words()
    bench_retrieval(words, args.sizes, args.hiddens, args.queries, args.repeats)
    bench_stage02(words, users=4, samples_per_user=25, items=500)
    with tempfile.TemporaryDirectory() as tmp:
        bench_memory(words, args.memory_users, args.memory_pairs, 4096, Path(tmp))


if __name__ == "__main__":
    main()
