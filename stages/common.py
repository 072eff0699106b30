"""What every stage shares: the config fields with choices, the prompt and decoding
settings of the stages that write prompts, task defaults, stage inputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from data_process.artifact_io import MANIFEST, read_finished_jsonl
from data_process.config import CommonConfig, stage_dir
from data_process.records import check_not_empty
from data_process.schema import validate_sample
from steering.loading import DTYPES
from tasks import Task, get_task, task_names
from tasks.base import DEFAULT_MAX_PROMPT_TOKENS
from tasks.pwab import HISTORY_LINES

ON_ERROR = ["stop", "skip"]
C = TypeVar("C")


@dataclass
class StageConfig(CommonConfig):
    """:class:`CommonConfig` with the choices that only the upper layers know.

    ``NOT_IN_FINGERPRINT`` lists the fields that do not change a stage's outputs: where
    things are (the run directory, the config file; the model and data are fingerprinted
    by content instead of path), how the run is shown or forced, and the device (a
    resumed run may move between machines; ``dtype``, which changes the numbers, counts).
    A stage config adds its own (batch sizes where outputs do not depend on them).
    """

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset(
        {"run_dir", "data_dir", "model", "device", "overwrite", "config", "log_level", "debug"})

    task: str = field(default="lamp4", metadata={"help": "benchmark task", "choices": task_names()})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU",
                                                 "choices": ["auto", *DTYPES]})


@dataclass
class PromptSettings:
    """The prompt a model sees, shared by 03 (its tries), 05 and train_lora (config section
    ``prompt``): stated once, so adapters learn prompts 05 writes (train_lora's ``--prompt``
    says which algorithm's).  A stage that needs another value sets it in its own section,
    which comes after ``prompt``."""

    history_k: int | None = field(default=None, metadata={"min": 0, "help": "history items in a prompt "
                                                                   "(default: the task's)"})
    max_prompt_tokens: int = field(default=DEFAULT_MAX_PROMPT_TOKENS, metadata={
        "min": 1, "help": "token budget of a prompt; history is shortened or dropped to fit"})
    history_line: str | None = field(default=None, metadata={
        "help": "PersonalWAB: layout of a history line: title_first (title, category, rating, review, then the "
                "item's asin) | asin_first (the asin leads) (default: the task's)", "choices": list(HISTORY_LINES)})


@dataclass
class DecodingSettings:
    """How answers are decoded, shared by 03 (its tries) and 05 (config section ``decoding``)."""

    max_new_tokens: int | None = field(default=None, metadata={"min": 1, "help": "generation length "
                                                                       "(default: the task's)"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    sampling_temperature: float = field(default=1.0, metadata={"gt": 0, "help": "sampling temperature "
                                                                         "(with --do-sample)"})
    top_p: float = field(default=1.0, metadata={"gt": 0, "max": 1, "help": "nucleus sampling mass (with --do-sample)"})
    constrained: bool | None = field(default=None, metadata={"help": "decode only valid calls of the task's call "
                                                                     "schema (default: the task's)"})


def task_of(cfg: Any) -> Task:
    """The task ``cfg`` names, with the prompt settings of ``cfg`` it reads (its
    ``prompt_options``; see :func:`with_task_defaults` for its default settings)."""
    task = get_task(cfg.task)
    return task.configured(**{name: getattr(cfg, name, None) for name in task.prompt_options})


def with_task_defaults(cfg: C) -> C:
    """A copy of ``cfg`` with every unset (``None``) field the task has a default for filled in.

    ``cfg`` itself is left as it was given.  A field still ``None`` in the copy is one the
    task has no default for; stages that need it say so (:func:`require`).
    """
    defaults = task_of(cfg).defaults
    filled = {f.name: defaults[f.name] for f in dataclasses.fields(cfg)
              if getattr(cfg, f.name) is None and f.name in defaults}
    return dataclasses.replace(cfg, **filled)


def require(cfg: Any, *names: str) -> None:
    """Raise a clear error for settings that neither the config nor the task gives."""
    missing = [n for n in names if getattr(cfg, n) is None]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ValueError(f"task {cfg.task!r} has no default for {flags}: pass it as a flag or in the config")


def finished_input(run_dir: str | Path, name: str, script: str) -> Path:
    """The directory of a finished upstream stage, or an error saying which script to run."""
    path = stage_dir(run_dir, name)
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(f"{path / MANIFEST} does not exist: run scripts.{script} first")
    return path


def load_samples(path: Path, *, allow_empty: bool = False) -> list[dict]:
    """Read and validate one finished split file of stage 01 or 02.

    Strictly (see :func:`read_finished_jsonl`): a torn or malformed line, an edit since
    the stage finished, a duplicate sample id or (unless ``allow_empty``) an empty file
    is an error naming the file -- a sample is never silently lost or generated twice.
    """
    samples, first = [], {}
    for i, record in enumerate(read_finished_jsonl(path)):
        sample = validate_sample(record, f"{path}:{i + 1}")
        if first.setdefault(sample["id"], i + 1) != i + 1:
            raise ValueError(f"{path}:{i + 1}: record {sample['id']!r}: duplicate id (first at record "
                             f"{first[sample['id']]})")
        samples.append(sample)
    if not allow_empty:
        check_not_empty(samples, path, "samples")
    return samples
