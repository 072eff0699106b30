"""Stages 03, 04 and 05 (and 02's dense ranker) on Ray workers give the files of one process.

Every test here starts or joins Ray and Ray workers (each 10 s or more on 2 cores), so it is marked
``ray`` (``pytest -m "not ray"`` leaves it out) and shares one local Ray between tests;
the two-node cluster comes last.  A stage's outputs are compared byte for byte with the
one-process run's: the reference stage folder is moved aside, the stage runs again into
the same paths with other workers, and the files must be equal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from stages import generate
from stages.workers import Chunk, WorkerFailed, WorkersConfig, connect, ray_session, shards, user_chunks
from tests.conftest import REAL_MODEL, ROOT, run_stage
from tests.test_pipeline import write_config, write_fixture

pytestmark = pytest.mark.ray

ENCODER = REAL_MODEL.parent / "all-minilm-l6-v2"
# Small chunks, so that two workers share every stage's work.
STAGES = {"collect_pairs": ("pairs", ["--samples-per-chunk", "2"]),
          "extract_vectors": ("vectors", ["--chunk-pairs", "2"]),
          "generate": ("generations/seen_test/fints", ["--algo", "fints", "--samples-per-chunk", "2"])}
OUTPUTS = {"pairs": ["pairs.jsonl", "progress.jsonl", "summary.json"],
           "vectors": ["vectors.safetensors", "vectors.index.json", "user_vectors.safetensors"],
           "generations/seen_test/fints": ["generations.jsonl"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir):
    """A run directory whose stages 03-05 ran in this process, one worker: (config, run dir)."""
    root = tmp_path_factory.mktemp("ray_run")
    config = write_config(root / "config.json", root / "run", write_fixture(root / "raw"), tiny_llama_dir)
    for name in ("select_users", "rank_history"):
        run_stage(name, ["--config", str(config)])
    for name, (_, flags) in STAGES.items():
        run_stage(name, ["--config", str(config), *flags])
    return config, root / "run"


def rerun(reference, stage: str, *flags: str, first=None) -> None:
    """Move ``stage``'s reference outputs aside, run it again with ``flags``, compare the files.

    ``first(argv)``, when given, runs (and interrupts) the stage once before that.
    """
    config, run_dir = reference
    folder, stage_flags = STAGES[stage]
    out = run_dir / folder
    ref = out.with_name(out.name + ".ref")
    shutil.rmtree(ref, ignore_errors=True)
    out.rename(ref)
    argv = ["--config", str(config), *stage_flags, *flags]
    if first is not None:
        first(argv)
    run_stage(stage, argv)
    for name in OUTPUTS[folder]:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), f"{folder}/{name} differs"
    workers = int(flags[flags.index("--workers") + 1])
    assert json.loads((out / "manifest.json").read_text())["config"]["workers"] == workers


def test_chunks_hold_whole_users_in_input_order_and_a_user_stays_on_one_worker():
    users = ["a", "b", "a", "c", "c", "c", "d", "b"]
    chunks = user_chunks(users, lambda u: u, 3)
    assert [c.items for c in chunks] == [["a", "a"], ["b", "b"], ["c", "c", "c"], ["d"]]
    assert [c.positions for c in chunks] == [[0, 2], [1, 7], [3, 4, 5], [6]]
    big = user_chunks(["x"] * 5 + ["y"], lambda u: u, 2)
    assert [c.items for c in big] == [["x", "x"], ["x", "x"], ["x", "y"]]
    plan = shards(big + [Chunk(3, [6], ["z"], ["z"])], 2)
    # x's chunks (tied to y's by the shared chunk) stay together; z goes to the other worker.
    assert [[c.index for c in s] for s in plan] == [[0, 1, 2], [3]]


def test_one_worker_runs_in_this_process_without_importing_ray(reference):
    config, run_dir = reference
    code = ("import sys; from data_process.config import parse_config; from stages import generate; "
            f"generate.run(parse_config(generate.GenerateConfig, ['--config', {str(config)!r}, '--algo', 'zeroshot', "
            "'--tag', '_noray'])); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert (run_dir / "generations" / "seen_test" / "zeroshot_noray" / "manifest.json").exists()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for this module's local tests (the stages join it instead of starting one)."""
    assert connect(WorkersConfig(workers=2))
    yield
    ray.shutdown()


def test_dense_ranking_on_two_workers_writes_the_same_files_as_one_process(reference, local_ray, tmp_path):
    if not (ENCODER / "config.json").exists():
        pytest.skip("models/ not built (run scripts/setup.sh)")
    config, run_dir = reference
    outputs = {}
    for workers in ("1", "2"):
        run = tmp_path / f"w{workers}"
        shutil.copytree(run_dir / "data", run / "data")
        run_stage("rank_history", ["--config", str(config), "--run-dir", str(run), "--ranker", "dense",
                                   "--encoder", str(ENCODER), "--samples-per-chunk", "2", "--workers", workers])
        outputs[workers] = {p.name: p.read_bytes() for p in sorted((run / "ranked").glob("*.jsonl"))}
    assert outputs["1"] == outputs["2"] and len(outputs["1"]) >= 3


def test_a_ray_session_joins_a_running_ray_and_leaves_it_running(reference, local_ray):
    # tune holds one session for all its points; inside it a stage joins instead of starting Ray
    with ray_session(WorkersConfig(workers=2)):
        rerun(reference, "generate", "--workers", "2")
        assert ray.is_initialized()
    assert ray.is_initialized()  # joined, not started: not this session's to stop
    with ray_session(WorkersConfig(workers=1)):  # one worker: Ray is not touched
        pass
    assert ray.is_initialized()


def test_personalwab_pairs_on_two_workers_are_the_one_process_pairs(local_ray, tmp_path, tiny_llama_dir):
    from tests.conftest import FIXTURES

    config = tmp_path / "pwab.json"
    config.write_text(json.dumps({
        "task": "pwab", "run_dir": str(tmp_path / "run"), "data_dir": str(FIXTURES / "pwab"),
        "model": str(tiny_llama_dir), "device": "cpu", "dtype": "float32", "seed": 3,
        "select_users": {"num_users": 4, "num_unseen": 2, "min_history": 2, "min_train": 2},
        "train_sasrec": {"hidden": 16, "blocks": 1, "heads": 1, "epochs": 2, "threads": 1},
        "collect_pairs": {"tries": 1, "history_k": 2, "max_new_tokens": 80, "batch_size": 8,
                          "max_prompt_tokens": 512, "samples_per_chunk": 2}}))
    for name in ("select_users", "rank_history", "train_sasrec"):
        run_stage(name, ["--config", str(config)])
    pairs = tmp_path / "run" / "pairs"
    outputs = {}
    for workers in ("1", "2"):
        run_stage("collect_pairs", ["--config", str(config), "--workers", workers])
        outputs[workers] = {name: (pairs / name).read_bytes() for name in OUTPUTS["pairs"]}
        pairs.rename(pairs.with_name(f"pairs.w{workers}"))
    assert outputs["1"] == outputs["2"]
    assert json.loads(outputs["1"]["summary.json"])["totals"]["kept"] > 0


class DiesOnce(generate.GenerateJob):
    """Kills its worker process in the middle of the stage, once (a marker file remembers)."""

    def run(self, chunk):
        marker = Path(self.cfg.run_dir) / "killed_once"
        if chunk.index == 1 and not marker.exists():
            marker.touch()
            os._exit(1)
        return super().run(chunk)


class AlwaysDies(generate.GenerateJob):
    def run(self, chunk):
        if chunk.index == 1:
            os._exit(1)
        return super().run(chunk)


# Each stage's two-worker run is also one of the faults (worker start-ups are the slow part):
# 03 with its driver stopped and resumed, 05 with a worker killed; 04 runs plainly.
def test_03_on_two_workers_with_its_driver_stopped_and_resumed_writes_the_one_process_files(
        reference, local_ray, monkeypatch):
    from stages import collect_pairs

    real = collect_pairs.run_chunks

    def stops_after_one_chunk(*args, **kwargs):
        results = real(*args, **kwargs)
        yield next(results)
        results.close()  # what a killed driver leaves: one chunk written, the workers gone
        raise KeyboardInterrupt("driver killed")

    def interrupted(argv):
        monkeypatch.setattr(collect_pairs, "run_chunks", stops_after_one_chunk)
        with pytest.raises(KeyboardInterrupt):
            run_stage("collect_pairs", argv)
        monkeypatch.setattr(collect_pairs, "run_chunks", real)
        progress = (reference[1] / "pairs" / "progress.jsonl").read_text().splitlines()
        assert 0 < len(progress) <= 2 and not (reference[1] / "pairs" / "manifest.json").exists()

    rerun(reference, "collect_pairs", "--workers", "2", first=interrupted)


def test_04_on_two_workers_writes_the_one_process_files(reference, local_ray):
    rerun(reference, "extract_vectors", "--workers", "2")


def test_05_on_two_workers_with_one_killed_mid_stage_writes_the_one_process_files(reference, local_ray, monkeypatch):
    monkeypatch.setattr(generate, "GenerateJob", DiesOnce)
    rerun(reference, "generate", "--workers", "2", "--worker-retries", "1")
    assert (reference[1] / "killed_once").exists()  # the kill did happen, and Ray restarted the worker


def test_a_worker_that_keeps_dying_stops_the_stage_naming_its_users(reference, local_ray, monkeypatch):
    config, run_dir = reference
    monkeypatch.setattr(generate, "GenerateJob", AlwaysDies)
    argv = ["--config", str(config), *STAGES["generate"][1], "--tag", "_dies", "--workers", "2",
            "--worker-retries", "1"]
    with pytest.raises(WorkerFailed, match="restarted 1 time") as err:
        run_stage("generate", argv)
    samples = [json.loads(line) for line in (run_dir / "ranked" / "seen_test.jsonl").read_text().splitlines()]
    chunks = user_chunks(samples, lambda s: s["user_id"], 2)
    assert all(u in str(err.value) for u in chunks[1].users)
    out = run_dir / "generations" / "seen_test" / "fints_dies"
    assert not (out / "manifest.json").exists()
    written = [json.loads(line)["user_id"] for line in (out / "generations.jsonl").read_text().splitlines()]
    assert not set(written) & set(chunks[1].users)  # what finished is kept for a rerun


def test_a_two_node_cluster_writes_the_same_files_as_one_process(reference):
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the local Ray of the tests above
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert len(cluster.list_all_nodes()) == 2
        for stage in STAGES:  # each stage joins the cluster by its address and leaves it
            rerun(reference, stage, "--workers", "2", "--ray-address", cluster.address)
            assert not ray.is_initialized()
    finally:
        cluster.shutdown()
