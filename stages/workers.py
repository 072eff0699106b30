"""Run a stage's work in this process or across Ray workers, with the same outputs either way.

A stage's work is a list of items (samples, pairs), each owned by a user.  The items are
cut into **chunks** of whole users in input order (:func:`user_chunks`); a chunk's
composition depends on the input alone, never on the number of workers or on what an
earlier run finished, and a chunk is computed in one piece (one set of batches).  So a
chunk's result is the same whoever computes it, and the stage's files are the same for
``--workers 1``, ``--workers 8`` or a run killed and resumed.

``--workers 1`` (the default) computes the chunks here, one after the other, and never
imports Ray.  ``--workers N`` starts a local Ray (or joins ``--ray-address``), gives each
worker the chunks of a share of the users (:func:`shards`: all of a user's chunks on one
worker, so it keeps that user's retrieval index and vectors), and creates one actor per
worker, which loads the model once.  Every chunk result comes back to the driver as soon
as it is done (``ray.wait``); the driver alone writes the stage's files, appending each
result as it arrives (a driver killed with ``kill -9`` resumes from it) and putting the
files in input order when the stage ends (:func:`write_in_order`).  A worker that dies
is restarted by Ray (``max_restarts``) and its unfinished chunks rerun
(``max_task_retries``), at most ``--worker-retries`` times; then the stage stops with an
error naming the users of that worker's unfinished chunks.

A job is any picklable object with ``setup(users)`` (load the model; called once per
worker, with the users it will see) and ``run(chunk) -> result``, and optionally
``close()``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from data_process.artifact_io import read_jsonl, write_jsonl
from data_process.progress import tqdm
from stages.common import StageConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# Config fields that hold paths: a worker may run in another directory (or on another
# node that mounts the same files), so the jobs get them absolute.
PATH_FIELDS = ("run_dir", "data_dir", "model", "collect_model", "plugin", "encoder", "pairs_file")


@dataclass
class WorkersConfig(StageConfig):
    """:class:`StageConfig` plus where the work runs; none of it changes the outputs."""

    NOT_IN_FINGERPRINT = StageConfig.NOT_IN_FINGERPRINT | {
        "workers", "ray_address", "gpus_per_worker", "cpus_per_worker", "worker_retries"}

    workers: int = field(default=1, metadata={
        "min": 1, "help": "processes that share the work (1: this process, no Ray; >1: Ray actors, one model each)"})
    ray_address: str = field(default="", metadata={"help": "Ray cluster to join with --workers > 1: auto (the local "
                                                           "node's cluster), HOST:PORT or ray://HOST:10001; "
                                                           "empty: start a Ray on this machine"})
    gpus_per_worker: float = field(default=0.0,
                                   metadata={"min": 0, "help": "GPUs each worker reserves (1: one GPU per worker)"})
    cpus_per_worker: int = field(default=1,
                                 metadata={"min": 1, "help": "CPUs each worker reserves; also its torch threads"})
    worker_retries: int = field(default=2, metadata={
        "min": 0, "help": "times a dead worker is restarted and its unfinished chunks rerun before the stage fails"})


class Job(Protocol):
    def setup(self, users: list[str]) -> None: ...

    def run(self, chunk: Chunk) -> Any: ...


@dataclass
class Chunk:
    """Items computed together: ``positions`` in the input, the items themselves, their users."""

    index: int
    positions: list[int]
    items: list[Any]
    users: list[str]


class WorkerFailed(RuntimeError):
    """A worker kept dying: its unfinished chunks could not be computed."""


def check_workers(cfg: WorkersConfig) -> None:
    if cfg.workers < 1:
        raise ValueError(f"--workers {cfg.workers}: give 1 (this process) or more")
    if cfg.cpus_per_worker < 1 or cfg.gpus_per_worker < 0 or cfg.worker_retries < 0:
        raise ValueError("--cpus-per-worker must be >= 1, --gpus-per-worker and --worker-retries >= 0")


def user_chunks(items: list[Any], user_of, size: int) -> list[Chunk]:
    """``items`` cut into chunks of about ``size`` items, whole users in order of first
    appearance (a user with more than ``size`` items fills chunks of its own)."""
    if size < 1:
        raise ValueError(f"chunk size {size}: must be >= 1")
    by_user: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_user.setdefault(str(user_of(item)), []).append(i)
    chunks: list[Chunk] = []
    positions: list[int] = []

    def flush() -> None:
        if positions:
            ordered = sorted(positions)
            users = list(dict.fromkeys(str(user_of(items[i])) for i in ordered))
            chunks.append(Chunk(len(chunks), ordered, [items[i] for i in ordered], users))
            positions.clear()

    for own in by_user.values():
        for start in range(0, len(own), size):
            part = own[start:start + size]
            if len(positions) + len(part) > size:
                flush()
            positions.extend(part)
    flush()
    return chunks


def unfinished(chunks: list[Chunk], done: set[str], key: str = "id") -> list[Chunk]:
    """The chunks with an item whose ``key`` is not in ``done`` (what a resumed run computes)."""
    return [c for c in chunks if any(item[key] not in done for item in c.items)]


def shards(chunks: list[Chunk], workers: int) -> list[list[Chunk]]:
    """Chunks per worker: all chunks of a user on one worker, loads balanced by item count
    (largest group first to the least loaded worker); each worker's chunks in input order."""
    groups: list[list[Chunk]] = []
    for chunk in chunks:  # a user split over several chunks ties them together
        if groups and set(groups[-1][-1].users) & set(chunk.users):
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    loads, out = [0] * workers, [[] for _ in range(workers)]
    for group in sorted(groups, key=lambda g: -sum(len(c.items) for c in g)):
        w = loads.index(min(loads))
        out[w].extend(group)
        loads[w] += sum(len(c.items) for c in group)
    return [sorted(s, key=lambda c: c.index) for s in out]


def absolute_paths(cfg: Any) -> Any:
    """A copy of ``cfg`` whose path fields are absolute (empty ones stay empty)."""
    changes = {f.name: str(Path(getattr(cfg, f.name)).resolve()) for f in dataclasses.fields(cfg)
               if f.name in PATH_FIELDS and getattr(cfg, f.name)}
    return dataclasses.replace(cfg, **changes)


def run_chunks(job: Job, chunks: list[Chunk], cfg: WorkersConfig, *, desc: str, total: int = 0,
               done: int = 0) -> Iterator[tuple[Chunk, Any]]:
    """Yield ``(chunk, job.run(chunk))`` for every chunk, in the order they finish.

    One progress bar counts items: ``total`` (default: the chunks' items) of which
    ``done`` were finished before.
    """
    check_workers(cfg)
    bar = tqdm(total=total or sum(len(c.items) for c in chunks), initial=done, desc=desc, unit="item")
    try:
        if chunks and cfg.workers == 1:
            users = list(dict.fromkeys(u for c in chunks for u in c.users))
            job.setup(users)
            try:
                for chunk in chunks:
                    result = job.run(chunk)
                    bar.update(len(chunk.items))
                    yield chunk, result
            finally:
                getattr(job, "close", lambda: None)()
        elif chunks:
            for chunk, result in _on_ray(job, chunks, cfg):
                bar.update(len(chunk.items))
                yield chunk, result
    finally:
        bar.close()


class _Worker:
    """One Ray actor: the job set up once (model loaded) and run chunk by chunk."""

    def __init__(self, job: Job, users: list[str], threads: int, log_level: str):
        import torch

        from data_process.cli import setup_logging

        torch.set_num_threads(threads)
        setup_logging(log_level)  # records reach the driver through Ray's log forwarding
        self.job = job
        job.setup(users)

    def run(self, chunk: Chunk) -> Any:
        start = time.perf_counter()
        result = self.job.run(chunk)
        log.info("chunk %d: %d items of %s in %.1f s", chunk.index, len(chunk.items), ", ".join(chunk.users),
                 time.perf_counter() - start)
        return result


def connect(cfg: WorkersConfig) -> bool:
    """Start or join Ray unless this process already did; True when this call connected."""
    import ray

    if ray.is_initialized():
        return False
    # Workers import the project from where the driver has it (every node of a cluster
    # must have the project and the models at the same path: a shared filesystem or
    # identical checkouts); their progress bars are off, the driver shows one.
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(cfg.cpus_per_worker)}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if cfg.ray_address:
        kwargs["address"] = cfg.ray_address
    else:
        # A local Ray gets as many CPUs as the workers ask for, so that every actor starts
        # even when the workers oversubscribe the machine's cores.
        need = cfg.workers * cfg.cpus_per_worker
        kwargs.update(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False)
        if need > (os.cpu_count() or 1):
            log.warning("%d workers x %d CPUs oversubscribe this machine's %d cores", cfg.workers,
                        cfg.cpus_per_worker, os.cpu_count())
    ray.init(**kwargs)
    return True


@contextmanager
def ray_session(cfg: WorkersConfig) -> Iterator[None]:
    """Hold one Ray connection across several stage runs (tune's grid points): each run's
    ``run_chunks`` then starts only its actors, not a Ray instance (~10 s each).  Nothing
    happens with ``--workers 1``."""
    connected = cfg.workers > 1 and connect(cfg)
    try:
        yield
    finally:
        if connected:
            import ray

            ray.shutdown()


def _check_resources(cfg: WorkersConfig) -> None:
    import ray

    have = ray.cluster_resources()
    for name, per in (("CPU", cfg.cpus_per_worker), ("GPU", cfg.gpus_per_worker)):
        if per and have.get(name, 0) < per:
            raise ValueError(f"--workers {cfg.workers} with {per} {name}(s) each: the Ray cluster has "
                             f"{have.get(name, 0):g} {name}(s) in all, so no worker could start")
    if cfg.gpus_per_worker and have.get("GPU", 0) < cfg.workers * cfg.gpus_per_worker:
        log.warning("the Ray cluster has %g GPU(s) for %d workers x %g: some workers wait for others",
                    have.get("GPU", 0), cfg.workers, cfg.gpus_per_worker)


def _on_ray(job: Job, chunks: list[Chunk], cfg: WorkersConfig) -> Iterator[tuple[Chunk, Any]]:
    import ray
    from ray.exceptions import RayActorError

    connected = connect(cfg)
    actors = []
    try:
        _check_resources(cfg)
        remote = ray.remote(_Worker).options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                                             max_restarts=cfg.worker_retries,
                                             max_task_retries=cfg.worker_retries)
        pending: dict[Any, tuple[int, Chunk]] = {}
        plan = [s for s in shards(chunks, cfg.workers) if s]
        left: list[set[int]] = []
        for w, shard in enumerate(plan):
            users = list(dict.fromkeys(u for c in shard for u in c.users))
            actor = remote.remote(job, users, cfg.cpus_per_worker, cfg.log_level)
            actors.append(actor)
            left.append({c.index for c in shard})
            for chunk in shard:  # an actor runs its calls one at a time, in this order
                pending[actor.run.remote(chunk)] = (w, chunk)
        log.info("[workers] %d chunks of %d users on %d Ray workers", len(chunks),
                 len({u for c in chunks for u in c.users}), len(plan))
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            w, chunk = pending.pop(ready)
            try:
                result = ray.get(ready)
            except RayActorError as err:
                users = sorted({u for c in plan[w] if c.index in left[w] for u in c.users})
                raise WorkerFailed(
                    f"worker {w} died (or could not start) and was restarted {cfg.worker_retries} time(s) "
                    f"(--worker-retries); its "
                    f"unfinished chunks were not computed, users: {', '.join(users)}. What finished is written: "
                    f"rerun the stage to resume. Last error: {err}") from None
            left[w].discard(chunk.index)
            yield chunk, result
    finally:
        for actor in actors:
            ray.kill(actor)
        if connected:
            ray.shutdown()


def write_in_order(path: str | Path, ids: Iterable[str], key: str) -> None:
    """Rewrite the JSONL file ``path`` with its records in the order of ``ids`` (by field
    ``key``; records of one id keep their order).  Run when the stage ends, so the file
    is the same whatever order workers and resumed runs wrote it in."""
    rank: dict[str, int] = {}
    for i in ids:
        rank.setdefault(str(i), len(rank))
    records = read_jsonl(path)
    unknown = [r.get(key) for r in records if str(r.get(key)) not in rank]
    if unknown:
        raise ValueError(f"{path}: records with {key} {unknown[:3]} are not in this stage's input")
    write_jsonl(path, sorted(records, key=lambda r: rank[str(r[key])]))
