"""Stage configuration: one dataclass per stage, JSON defaults, CLI overrides.

A task config (``configs/<task>.json``) holds the fields every stage shares at its top
level (see :class:`CommonConfig`), shared sections of settings several stages read
(``prompt``, ``decoding``) and one section per stage; a config class's ``SECTIONS`` names
the ones it reads, shared ones first (``("prompt", "decoding", "generate")``).
Precedence, lowest first: dataclass defaults < top-level keys < the stage's sections (in
order, so a stage's own section overrides a shared one) < CLI flags.  A key
that the stage does not know is an error naming the file and the key.  Every value is
validated by one set of rules (:func:`value_problem`: the field's type, and its metadata's
``choices``, ranges, non-empty lists, plain names; floats finite), applied alike to a
config value (the error names file, section and key) and to a flag (it names the flag).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from transformers import HfArgumentParser

from data_process.artifact_io import read_json
from data_process.schema import SAFE_NAME_RULE, is_safe_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

T = TypeVar("T")

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

# Names of the sections a task config may hold: shared ones, then one per stage (and the server).
STAGE_SECTIONS = ("prompt", "decoding", "select_users", "rank_history", "collect_pairs", "extract_vectors",
                  "generate", "evaluate", "sweep", "train_sasrec", "train_lora", "tune", "report", "serve")


@dataclass
class CommonConfig:
    """Fields shared by every stage (the top level of a task config)."""

    SECTIONS: ClassVar[tuple[str, ...]] = ()  # config sections this stage reads, in order

    task: str = field(default="lamp4", metadata={"help": "benchmark task (a module of tasks/)"})
    run_dir: str = field(default="runs/lamp4", metadata={"help": "root directory of this experiment's artifacts"})
    data_dir: str = field(default="", metadata={"help": "directory holding the raw benchmark files"})
    model: str = field(default="models/smollm2-135m-instruct",
                       metadata={"help": "local directory of the model that is steered"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto",
                       metadata={"help": "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16"})
    seed: int = field(default=42, metadata={"min": 0, "help": "random seed of every sampling step"})
    overwrite: bool = field(default=False, metadata={"help": "redo a stage whose manifest exists"})
    config: str = field(default="", metadata={"help": "task config JSON supplying defaults for every flag"})
    layers_attr: str = field(default="", metadata={
        "help": "for architectures layer discovery does not know: 'path[:attn[:mlp[:attn_norm:mlp_norm]]]', "
                "the dotted path to the decoder layers, the attention and MLP attribute names of a layer "
                "(default self_attn, mlp) and the norms applied to their outputs before the residual add, "
                "if any (e.g. post_attention_layernorm, post_feedforward_layernorm)"})
    log_level: str = field(default="INFO", metadata={"help": "logging level", "choices": LOG_LEVELS})
    debug: bool = field(default=False, metadata={"help": "show the Python traceback of an error"})


def suggest(name: str, options: list[str] | tuple[str, ...]) -> str:
    """' Did you mean X?' for the closest option, or ''."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def choose(kind: str, name: str, registry: dict[str, T]) -> T:
    """Pick a strategy by name, with a 'Did you mean' error for unknown names."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}.{suggest(name, list(registry))}")
    return registry[name]


def config_defaults(path: str | Path, config_cls: type, sections: tuple[str, ...]) -> dict[str, Any]:
    """Read the defaults a task config gives a stage: its top-level keys, then each of
    ``sections`` in order (a later one wins), every value checked by :func:`value_problem`
    (an error names the file, the section and the key)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a task config must be a JSON object")
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    defaults: dict[str, Any] = {}

    def take(key: str, value: Any, where: str) -> None:
        problem = value_problem(fields[key], hints[key], value)
        if problem:
            raise ValueError(f"{path}: {where}key {key!r}: {problem}")
        defaults[key] = value

    for key, value in raw.items():
        if key.startswith("_"):  # "_comment" keys document the file
            continue
        if key in STAGE_SECTIONS:
            continue
        if key not in common:
            known = sorted(common | set(STAGE_SECTIONS))
            raise ValueError(f"{path}: unknown top-level key {key!r}.{suggest(key, known)}"
                             f" Top-level keys are {sorted(common)} and stage sections {list(STAGE_SECTIONS)}")
        if key in fields:
            take(key, value, "top-level ")
    for section in sections:
        stage_raw = raw.get(section, {})
        if not isinstance(stage_raw, dict):
            raise ValueError(f"{path}: section {section!r} must be a JSON object")
        for key, value in stage_raw.items():
            if key.startswith("_"):
                continue
            if key not in fields:
                raise ValueError(f"{path}: unknown key {key!r} in section {section!r}.{suggest(key, sorted(fields))}")
            take(key, value, f"section {section!r}, ")
    return defaults


RULE_KEYS = ("min", "max", "gt", "lt", "non_empty", "name")  # field metadata read by value_problem
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _type_problem(tp: Any, value: Any) -> str:
    """Why ``value`` (as JSON gives it) is not of the annotated type ``tp`` ('' when it is)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return ""
        (tp,) = [a for a in args if a is not type(None)]
        args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            return f"must be a list of {_PLURALS[args[0]]}, got {value!r}"
        return next((p for p in (_type_problem(args[0], v) for v in value) if p), "")
    # bool is an int subclass: true is not a count; an int is a fine float.
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[tp]
    if isinstance(value, bool) and tp is not bool or not isinstance(value, ok):
        return f"must be {_TYPE_NAMES[tp]}, got {value!r}"
    return ""


def _range_problem(rules: dict[str, Any], value: Any) -> str:
    """Why one scalar breaks a field's rules ('' when it does not)."""
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        return f"{value!r} is not one of {list(choices)}.{suggest(str(value), [str(c) for c in choices])}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        if rules.get("name") and value and not is_safe_name(value):
            return f"{value!r} is not a plain name ({SAFE_NAME_RULE})"
        return ""
    for key, fails, text in (("min", lambda b: value < b, "at least"), ("max", lambda b: value > b, "at most"),
                             ("gt", lambda b: value <= b, "above"), ("lt", lambda b: value >= b, "below")):
        if key in rules and fails(rules[key]):
            return f"must be {text} {rules[key]}, got {value!r}"
    return ""


def value_problem(f: dataclasses.Field, tp: Any, value: Any) -> str:
    """Why ``value`` cannot be field ``f``'s setting ('' when it can): its type, then the
    rules in the field's metadata -- ``choices``, ``min`` / ``max`` (inclusive), ``gt`` /
    ``lt`` (exclusive), ``non_empty`` (lists), ``name`` (a plain file name) -- applied to
    a list's every item; a float must be finite.  Flags and config values alike."""
    problem = _type_problem(tp, value)
    if problem or value is None:
        return problem
    if isinstance(value, list) and not value and f.metadata.get("non_empty"):
        return "must not be empty"
    for item in value if isinstance(value, list) else [value]:
        problem = _range_problem(f.metadata, item)
        if problem:
            return problem
    return ""


class _Parser(HfArgumentParser):
    """Flag errors raise ``ValueError`` (one ``error:`` line from the CLI, no usage dump)."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(action, f"{value!r} is not one of {list(action.choices)}."
                                                 f"{suggest(str(value), [str(c) for c in action.choices])}")

    def error(self, message: str):  # noqa: ANN201 -- argparse's signature
        raise ValueError(f"{message} (see --help)")

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
        # The validation rules are ours (value_problem), not argparse keywords.
        shown = copy.copy(f)
        shown.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k not in RULE_KEYS})
        HfArgumentParser._parse_dataclass_field(_DashedOnly(parser), shown)


class _DashedOnly:
    """Hands HfArgumentParser's ``add_argument`` calls on without the underscore twin of a
    dashed flag (``--run_dir`` beside ``--run-dir``), so ``--help`` shows each flag once and
    one spelling is accepted.  argparse derives the same ``dest`` (``run_dir``) from either."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._parser = parser

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        dashed = [n for n in names if not (n.startswith("--") and "_" in n and n.replace("_", "-") in names)]
        return self._parser.add_argument(*dashed, **kwargs)


def parse_config(config_cls: type[T], argv: list[str] | None = None) -> T:
    """Parse a stage config: dataclass defaults < ``--config`` JSON sections < CLI flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # No abbreviated flags: '--conf X' would set --config without its file being read.
    parser = _Parser(config_cls, allow_abbrev=False)
    config_path = _peek_config(argv)
    if config_path:
        parser.set_defaults(**config_defaults(config_path, config_cls, config_cls.SECTIONS))
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    check_settings(cfg)
    return cfg


def check_settings(cfg: Any) -> None:
    """Apply :func:`value_problem` to every field of a parsed config.

    Config-file values were checked as they were read (naming file, section and key), so
    a value that fails here came from a flag (or was set in code): the error names it.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        problem = value_problem(f, hints[f.name], getattr(cfg, f.name))
        if problem:
            raise ValueError(f"--{f.name.replace('_', '-')}: {problem}")


def _peek_config(argv: list[str]) -> str:
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    if len(paths) > 1:
        raise ValueError(f"--config given {len(paths)} times ({', '.join(paths)}); give one task config")
    return paths[0] if paths else ""


def stage_dir(run_dir: str | Path, name: str) -> Path:
    """Where stage ``name`` keeps its artifacts inside a run directory."""
    return Path(run_dir) / name
