"""The stage-05 generation loop: an algorithm's messages and steering rows through
:func:`steering.generation.generate_batches`, one record per sample.

Records are written batch by batch (so a killed run resumes where it stopped); batches
are length-sorted and mix users and queries with one steering row each.  With per-user
LoRA adapters (``--plugin``), rows are grouped by user instead: see :class:`UserAdapters`
(checked once by :func:`find_adapters`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_process.artifact_io import JsonlWriter
from data_process.progress import tqdm
from data_process.schema import checked_name
from steering.algorithms import ZeroShot
from steering.generation import generate_batches
from tasks import Task

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class AdapterSet:
    """Per-user adapters, ``root/<user_id>/``, as :func:`find_adapters` checked them (once)."""

    root: Path
    users: list[str]  # users with an adapter (sorted)
    missing: list[str]  # users of the run without one: they run the base model

    def files(self) -> list[Path]:
        """The files a run reads from the users' adapters (their config and weights)."""
        return [f for u in self.users
                for f in [self.root / u / ADAPTER_CONFIG, *sorted((self.root / u).glob("adapter_model.*"))]]

    def only(self, user_ids: list[str]) -> AdapterSet:
        """The adapters of ``user_ids`` alone (a worker's share of the users)."""
        wanted = set(user_ids)
        return AdapterSet(self.root, [u for u in self.users if u in wanted], [u for u in self.missing if u in wanted])


def find_adapters(plugin_dir: str | Path, user_ids: list[str], source: str | Path = "") -> AdapterSet:
    """Check ``plugin_dir`` against the run's users: which have an adapter, which do not.

    A user id names its adapter folder: one that is not a plain name ('../x', '/abs',
    'a/b') would load an adapter from outside the directory, an error naming ``source``
    (the file the ids come from).  No adapter for any user is an error too.
    """
    root = Path(plugin_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--plugin {root}: no such directory")
    users = sorted(set(user_ids))
    for user in users:
        checked_name(user, f"{source} (adapters in --plugin {root})" if source else f"--plugin {root}")
    found = [u for u in users if (root / u / ADAPTER_CONFIG).exists()]
    if not found:
        raise FileNotFoundError(f"--plugin {root}: no <user_id>/{ADAPTER_CONFIG} for any of "
                                f"the {len(users)} users of this split")
    return AdapterSet(root, found, [u for u in users if u not in found])


class UserAdapters:
    """Per-user PEFT LoRA adapters (an :class:`AdapterSet`) on top of a frozen model.

    Why group rows by user instead of one mixed batch with ``adapter_names=``: the shared
    generation utility (and its steering hooks) takes plain ``generate`` kwargs, and
    grouping keeps every row's computation identical to running that user alone.  Steering
    hooks sit on the decoder layers' attention/MLP outputs, which LoRA leaves in place, so
    steering applies on top of the adapter.  Users without an adapter run the base model.
    """

    def __init__(self, model, adapters: AdapterSet):
        from peft import PeftModel

        found, root = adapters.users, adapters.root
        # Adapter names become module keys, so they must be plain identifiers.
        self.names = {u: f"user_{i}" for i, u in enumerate(found)}
        self.model = PeftModel.from_pretrained(model, root / found[0], adapter_name=self.names[found[0]])
        for user in found[1:]:
            self.model.load_adapter(root / user, adapter_name=self.names[user])
        self.model.eval()
        self.model.requires_grad_(False)
        self.missing = adapters.missing

    def close(self) -> None:
        """Take the LoRA layers out again, leaving the base model as it was loaded."""
        self.model.unload()

    @contextmanager
    def active(self, user_id: str) -> Iterator[None]:
        """Run the body with ``user_id``'s adapter (or no adapter when the user has none)."""
        if user_id in self.names:
            self.model.set_adapter(self.names[user_id])
            yield
        else:
            with self.model.disable_adapter():
                yield


def _record(task: Task, algo: str, sample: dict, message: str, generation: str) -> dict[str, Any]:
    record = {"id": sample["id"], "user_id": sample["user_id"], "algo": algo, "prompt": message,
              "generation": generation, "gold": sample["output"]}
    record.update({k: sample.get(k) for k in task.record_fields})
    return record


def generate_records(model, tok, algo: ZeroShot, samples: list[dict], writer: JsonlWriter, *,
                     task: Task, algo_name: str, batch_size: int, gen_kwargs: dict[str, Any],
                     adapters: UserAdapters | None = None) -> dict[str, Any]:
    """Generate every sample not yet in ``writer`` and append its record; return a summary.

    ``gen_kwargs`` go to :func:`steering.generation.generate_batches` (max_new_tokens,
    do_sample, temperature, top_p, seed, positions); answers pass the task's postprocess.
    """
    done = {r["id"] for r in writer.existing}
    pending = [s for s in samples if s["id"] not in done]
    prepared = algo(pending) if pending else None
    missing = sorted(prepared.missing_users) if prepared else []
    bar = tqdm(total=len(pending), desc=f"05 {algo_name}", unit="sample")
    # Without adapters the whole split is one call (sorted and batched there once); with
    # them, one call per user, under that user's adapter.
    groups = _by_user(pending) if adapters else [list(range(len(pending)))]
    # The LoRA layers live inside the wrapped model; calling it directly keeps the
    # steering hooks' per-call pre-hook on the module that actually runs forward.
    run_model = adapters.model.get_base_model() if adapters else model
    for group in groups if pending else []:
        deltas = {k: v[group] for k, v in prepared.deltas.items()} if prepared.deltas else None
        with adapters.active(pending[group[0]]["user_id"]) if adapters else nullcontext():
            # Unsteered prompts compute a shared head once (PersonalWAB's tool list); steered
            # rows change every position, so generate_batches computes them whole.
            for rows, texts in generate_batches(run_model, tok, [prepared.messages[i] for i in group],
                                                batch_size=batch_size, deltas=deltas, desc=algo_name,
                                                share_prefix=True, **gen_kwargs):
                for j, text in zip(rows, texts, strict=True):
                    i = group[j]
                    writer.write(_record(task, algo_name, pending[i], prepared.messages[i], task.postprocess(text)))
                bar.update(len(rows))
    bar.close()
    return {"n_samples": len(samples), "n_resumed": len(samples) - len(pending),
            "n_generated": len(pending), "users_without_vectors": missing}


def _by_user(samples: list[dict]) -> list[list[int]]:
    """Sample indices grouped by user, users in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s["user_id"], []).append(i)
    return list(groups.values())

