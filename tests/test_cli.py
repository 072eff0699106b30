"""User errors at the command line: one `error:` line, exit code 2, no traceback."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from data_process.cli import main
from data_process.config import parse_config
from stages.evaluate import EvaluateConfig
from stages.generate import GenerateConfig
from stages.select_users import SelectUsersConfig
from stages.select_users import run as select_users

from .conftest import ROOT

CONFIG = str(ROOT / "configs" / "lamp4.json")


def fails_with_one_line(capsys, config_cls, run, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(config_cls, run, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and err.startswith("error: ") and "Traceback" not in err
    return err


def test_a_misspelled_config_key_names_the_key_and_the_closest_one(tmp_path, capsys):
    config = tmp_path / "task.json"
    config.write_text(json.dumps({"task": "lamp4", "select_users": {"num_user": 3}}))
    err = fails_with_one_line(capsys, SelectUsersConfig, select_users, ["--config", str(config)])
    assert str(config) in err and "'num_user'" in err and "Did you mean 'num_users'" in err


def test_an_unknown_algorithm_flag_lists_the_choices(capsys):
    err = fails_with_one_line(capsys, GenerateConfig, lambda cfg: None, ["--config", CONFIG, "--algo", "fintz"])
    assert "--algo" in err and "Did you mean 'fints'" in err and "'zeroshot'" in err


def test_a_config_value_outside_the_choices_is_rejected_too(tmp_path, capsys):
    config = tmp_path / "task.json"
    config.write_text(json.dumps({"task": "lamp4", "generate": {"pair_weighting": "softmx"}}))
    err = fails_with_one_line(capsys, GenerateConfig, lambda cfg: None, ["--config", str(config)])
    assert f"{config}: section 'generate', key 'pair_weighting': 'softmx'" in err and "Did you mean 'softmax'" in err
    config.write_text(json.dumps({"task": "lamp-4"}))
    assert "top-level key 'task': 'lamp-4'" in fails_with_one_line(
        capsys, GenerateConfig, lambda cfg: None, ["--config", str(config)])


def test_a_missing_data_dir_is_named_and_nothing_is_written(tmp_path, capsys):
    argv = ["--config", CONFIG, "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nowhere")]
    err = fails_with_one_line(capsys, SelectUsersConfig, select_users, argv)
    assert "nowhere" in err and not (tmp_path / "run").exists()


def test_two_config_flags_are_an_error(capsys):
    err = fails_with_one_line(capsys, SelectUsersConfig, select_users, ["--config", CONFIG, "--config", CONFIG])
    assert "--config given 2 times" in err


def test_debug_shows_the_traceback_instead(tmp_path):
    argv = ["--config", CONFIG, "--data-dir", str(tmp_path / "nowhere"), "--debug"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(SelectUsersConfig, select_users, argv)


def test_log_level_is_a_choice_and_configures_the_project_loggers(capsys):
    main(GenerateConfig, lambda cfg: logging.getLogger("stages.x").info("hello from a stage"),
         ["--config", CONFIG, "--log-level", "WARNING"])
    assert "hello from a stage" not in capsys.readouterr().out
    main(GenerateConfig, lambda cfg: logging.getLogger("stages.x").info("hello from a stage"), ["--config", CONFIG])
    assert "hello from a stage" in capsys.readouterr().out
    assert "Did you mean 'INFO'" in fails_with_one_line(capsys, GenerateConfig, lambda cfg: None,
                                                        ["--log-level", "INF"])


def test_help_lists_the_choices_of_choice_flags():
    helptext = subprocess.run([sys.executable, "-m", "scripts.05_generate", "--help"], cwd=ROOT, capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120).stdout
    assert "{zeroshot,rag,steer,fints,oppu,oppu+fints}" in helptext
    assert "{lamp4,lamp4_style,lamp5,longlamp,pwab}" in helptext
    assert "{softmax,mean}" in helptext and "{attn,mlp,block}" in helptext


def test_help_shows_each_flag_once_in_its_dashed_form(capsys):
    with pytest.raises(SystemExit):
        parse_config(GenerateConfig, ["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    names = re.findall(r"^  (--?[\w-]+(?:, --?[\w-]+)*)", options, re.M)
    assert "--run-dir" in names and "--max-new-tokens" in names
    assert [n for n in names if "," in n or "_" in n] == ["-h, --help"]


def test_only_the_dashed_spelling_of_a_flag_is_accepted():
    assert parse_config(GenerateConfig, ["--run-dir", "runs/x"]).run_dir == "runs/x"
    with pytest.raises(ValueError, match="--run_dir"):
        parse_config(GenerateConfig, ["--run_dir", "runs/x"])
    assert parse_config(EvaluateConfig, ["--no-plot"]).plot is False
    with pytest.raises(ValueError, match="--no_plot"):
        parse_config(EvaluateConfig, ["--no_plot"])


def test_the_script_itself_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scripts.01_select_users", "--config", CONFIG,
                           "--data-dir", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: data directory")


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_parses_for_every_stage(config):
    import dataclasses
    import importlib
    import pkgutil

    import stages

    for info in pkgutil.iter_modules(stages.__path__):
        module = importlib.import_module(f"stages.{info.name}")
        for cls in vars(module).values():
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__ \
                    and getattr(cls, "STAGE", None):
                parse_config(cls, ["--config", str(config)])
