"""The one entry point shape of every stage script: parse, set up logging, run.

``scripts/NN_name.py`` calls :func:`main` with its stage's config class and ``run``
function.  A user error -- a bad flag or config value, a missing or malformed file, a model
directory without a model -- prints one ``error: <message>`` line naming the file, record
or field and exits with code 2; ``--debug`` shows the traceback instead.  Log records go
through tqdm, so messages and progress bars do not tear each other.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from data_process.config import LOG_LEVELS, parse_config
from data_process.progress import tqdm

T = TypeVar("T")

# What a user can cause and fix: bad values (ValueError covers JSON and Unicode decoding
# errors too) and missing files or directories.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class _TqdmHandler(logging.Handler):
    """Writes records above any running progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)
        except Exception:  # noqa: BLE001 -- logging must never crash the stage
            self.handleError(record)


def setup_logging(level: str = "INFO") -> None:
    """Route every logger of the project through one tqdm-friendly handler."""
    if level not in LOG_LEVELS:
        raise ValueError(f"--log-level {level!r} is not one of {LOG_LEVELS}")
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _TqdmHandler)] + [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(config_cls: type[T], run: Callable[[T], Any], argv: list[str] | None = None) -> Any:
    """Parse ``argv`` into ``config_cls`` and call ``run(cfg)``; user errors exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cfg = parse_config(config_cls, argv)
        setup_logging(cfg.log_level)
        return run(cfg)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
