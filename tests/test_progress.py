"""Progress bars: the real bar on a terminal, a few plain lines in a log file."""

from __future__ import annotations

import io
import logging

from data_process.cli import setup_logging
from data_process.progress import tqdm


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_thousand_updates_to_a_log_file_write_a_start_and_an_end_line_without_carriage_returns():
    log = io.StringIO()
    with tqdm(total=1000, desc="collect pairs", unit="sample", file=log) as bar:
        for i in range(1000):
            bar.update(1)
            bar.set_postfix(kept=i)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert len(lines) == 2 and lines[0].startswith("collect pairs:   0% 0/1000")
    assert lines[1].startswith("collect pairs: 100% 1000/1000") and "sample/s" in lines[1] and "kept=999" in lines[1]


def test_a_slow_loop_also_prints_each_quarter_once(monkeypatch):
    monkeypatch.setattr(tqdm, "PLAIN_GAP_S", 0.0)  # every quarter is due at once
    log = io.StringIO()
    for _ in tqdm(range(1000), desc="extract", file=log, mininterval=0):
        pass
    percents = [line.split()[1] for line in log.getvalue().splitlines()]
    assert percents == ["0%", "25%", "50%", "75%", "100%"]


def test_nested_bars_in_a_log_file_add_no_lines_for_the_inner_loops(capsys):
    for _ in tqdm(range(50), desc="users"):  # to sys.stderr, which capsys makes a non-terminal
        for _ in tqdm(range(20), desc="batches"):
            pass
        for _ in tqdm(range(20), desc="transient", leave=False):
            pass
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["users", "users"]


def test_a_bar_without_a_total_prints_counts():
    log = io.StringIO()
    with tqdm(desc="index products", unit="doc", file=log) as bar:
        bar.update(5)
    assert log.getvalue().splitlines()[-1].startswith("index products: 5doc [")


def test_on_a_terminal_it_is_the_real_tqdm_bar():
    screen = _Terminal()
    for _ in tqdm(range(10), desc="generate", file=screen):
        pass
    assert "\r" in screen.getvalue() and "generate: 100%|" in screen.getvalue()


def test_disable_none_still_means_off_when_not_a_terminal():
    log = io.StringIO()
    for _ in tqdm(range(10), file=log, disable=None):
        pass
    assert log.getvalue() == ""


def test_log_records_still_reach_the_output_while_a_bar_is_open(capsys):
    setup_logging("INFO")
    with tqdm(total=2, desc="stage") as bar:
        logging.getLogger("stages.x").info("halfway")
        bar.update(2)
    assert "halfway" in capsys.readouterr().out
