"""The benchmark tasks: one module per benchmark, each defining ``TASK`` (a :class:`Task`).

Tasks are found by scanning this package, so adding a benchmark is one new module here
(plus a config in ``configs/``); :func:`get_task` picks one by name with a "Did you
mean" error for unknown names.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from data_process.config import choose
from tasks.base import Task

__all__ = ["Task", "get_task", "task_names"]


@functools.cache
def _registry() -> dict[str, Task]:
    found: dict[str, Task] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        task = getattr(importlib.import_module(f"{__name__}.{info.name}"), "TASK", None)
        if isinstance(task, Task):
            if task.name in found:
                raise RuntimeError(f"two task modules define task {task.name!r}")
            found[task.name] = task
    return found


def task_names() -> list[str]:
    """Names of every task, sorted."""
    return sorted(_registry())


def get_task(name: str) -> Task:
    """The task called ``name``."""
    return choose("task", name, _registry())
