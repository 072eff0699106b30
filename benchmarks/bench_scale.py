"""Scaling stages 03 and 05 out on Ray (a benchmark, not a test): prints its ratios.

    python -m benchmarks.bench_scale --samples 16

On the demo data (data/demo/lamp4) and SmolLM2-135M-Instruct, stage 03 (pair collection,
``--max-samples``) and stage 05 (``--algo rag``, ``--limit``) run three ways, each in a
fresh copy of the same run directory:

* 1 process x 1 torch thread (``--workers 1``),
* 1 process x 2 torch threads (``--workers 1``),
* 2 Ray workers x 1 thread (``--workers 2 --cpus-per-worker 1``, joining a Ray started
  once before: its start-up is reported on its own).

Each configuration's throughput is samples per second of the stage's wall time, model
loading included (what a user waits for); ratios are against 1 process x 1 thread, all
measured in this one run.  The three runs' output files must be byte-identical (checked).
Ray's fixed costs are reported apart: starting a local Ray, and creating the workers up
to a loaded model (vs loading the model in this process).  On a machine that other jobs
share, run it when it is quiet; the numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from data_process.config import parse_config
from stages import collect_pairs, generate, rank_history, select_users
from stages.workers import Chunk, WorkersConfig, connect
from steering.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.json"
MODEL = ROOT / "models" / "smollm2-135m-instruct"
WAYS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 workers x 1 thread", 2, 1)]
OUTPUT = {"03": "pairs/pairs.jsonl", "05": "generations/seen_test/rag/generations.jsonl"}


class _LoadOnly:
    """A job that only loads the model: what a worker costs before its first chunk."""

    def __init__(self, model: str):
        self.model = model

    def setup(self, users):
        load_model(self.model, "cpu", "float32")

    def run(self, chunk):
        return None


def _stage(module, config_cls, argv: list[str]) -> float:
    start = time.perf_counter()
    module.run(parse_config(config_cls, argv))
    return time.perf_counter() - start


def _ray_overhead(threads: int) -> dict[str, float]:
    import ray

    from stages.workers import _Worker

    start = time.perf_counter()
    connect(WorkersConfig(workers=2, cpus_per_worker=threads))
    started = time.perf_counter() - start
    start = time.perf_counter()
    load_model(str(MODEL), "cpu", "float32")
    here = time.perf_counter() - start
    remote = ray.remote(_Worker).options(num_cpus=threads)
    start = time.perf_counter()
    actors = [remote.remote(_LoadOnly(str(MODEL)), [], threads, "WARNING") for _ in range(2)]
    ray.get([a.run.remote(Chunk(0, [], [], [])) for a in actors])  # answers once set up
    workers = time.perf_counter() - start
    for actor in actors:
        ray.kill(actor)
    return {"ray_start_s": started, "load_in_process_s": here, "two_workers_ready_s": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="samples per stage run")
    parser.add_argument("--chunk", type=int, default=4, help="samples per chunk (both ways)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        common = ["--config", str(CONFIG), "--model", str(MODEL), "--device", "cpu", "--dtype", "float32"]
        prepared = base / "prepared"
        preparing = ((select_users, select_users.SelectUsersConfig), (rank_history, rank_history.RankHistoryConfig))
        for module, cls in preparing:
            module.run(parse_config(cls, [*common, "--run-dir", str(prepared)]))
        overhead = _ray_overhead(1)
        results: dict[str, dict[str, float]] = {"03": {}, "05": {}}
        outputs: dict[str, set[bytes]] = {"03": set(), "05": set()}
        for label, workers, threads in WAYS:
            torch.set_num_threads(threads)  # this process's threads; Ray workers set their own
            run = base / label.replace(" ", "_")
            shutil.copytree(prepared, run)
            flags = [*common, "--run-dir", str(run), "--workers", str(workers), "--cpus-per-worker", "1"]
            results["03"][label] = _stage(collect_pairs, collect_pairs.CollectPairsConfig,
                                          [*flags, "--max-samples", str(args.samples), "--samples-per-chunk",
                                           str(args.chunk)])
            results["05"][label] = _stage(generate, generate.GenerateConfig,
                                          [*flags, "--algo", "rag", "--limit", str(args.samples),
                                           "--samples-per-chunk", str(args.chunk)])
            for stage, path in OUTPUT.items():
                outputs[stage].add((run / path).read_bytes())
        print(f"\nbench_scale: {args.samples} samples per stage, chunks of {args.chunk}, SmolLM2-135M, "
              f"{torch.get_num_interop_threads()} interop threads, on this machine now")
        for stage, name in (("03", "03 collect pairs"), ("05", "05 generate rag")):
            base_s = results[stage][WAYS[0][0]]
            print(f"{name}:")
            for label, seconds in results[stage].items():
                print(f"  {label:24s} {seconds:7.1f} s  {args.samples / seconds:6.2f} samples/s  "
                      f"x{base_s / seconds:.2f} vs 1x1")
            print(f"  outputs identical across the three: {len(outputs[stage]) == 1}")
        print("Ray fixed overhead:")
        print(f"  start a local Ray           {overhead['ray_start_s']:6.1f} s")
        print(f"  load the model here         {overhead['load_in_process_s']:6.1f} s")
        print(f"  2 workers up, model loaded  {overhead['two_workers_ready_s']:6.1f} s")
        print(json.dumps({"throughput_s": results, "overhead_s": overhead}, indent=1))
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
