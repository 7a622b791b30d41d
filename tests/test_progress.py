"""transfgu.progress.progress: a tqdm bar on a terminal, plain log lines (no carriage returns) otherwise."""
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transfgu import dist
from transfgu import progress as prog

REPO = Path(__file__).resolve().parent.parent


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_mode_follows_the_stream_and_the_environment(monkeypatch):
    monkeypatch.delenv(prog.PROGRESS_ENV, raising=False)
    assert prog.progress_mode(Tty()) == "bar"
    assert prog.progress_mode(io.StringIO()) == "lines"
    monkeypatch.setenv(prog.PROGRESS_ENV, "lines")
    assert prog.progress_mode(Tty()) == "lines"
    monkeypatch.setenv(prog.PROGRESS_ENV, "off")
    assert prog.progress_mode(Tty()) == "off"
    monkeypatch.setenv(prog.PROGRESS_ENV, "sometimes")
    with pytest.raises(ValueError, match="TRANSFGU_PROGRESS"):
        prog.progress_mode(Tty())


def test_lines_every_n_percent_and_items_unchanged(monkeypatch, caplog):
    monkeypatch.setenv(prog.PROGRESS_ENV, "lines")
    monkeypatch.setenv(prog.PROGRESS_EVERY_ENV, "25")
    monkeypatch.setenv(prog.PROGRESS_SECONDS_ENV, "0")
    caplog.set_level(logging.INFO, logger="transfgu.progress")
    items = list(prog.progress(range(20), desc="work", unit="batch", leave=False))
    assert items == list(range(20))
    lines = [r.getMessage() for r in caplog.records if r.name == "transfgu.progress"]
    assert [line.split(" in ")[0] for line in lines] == [f"work: {n}/20 batch ({n * 5}%)" for n in (5, 10, 15, 20)]


def test_lines_without_a_length_double_and_end_with_the_count(monkeypatch, caplog):
    monkeypatch.setenv(prog.PROGRESS_ENV, "lines")
    monkeypatch.setenv(prog.PROGRESS_SECONDS_ENV, "0")
    caplog.set_level(logging.INFO, logger="transfgu.progress")
    bar = prog.progress((i for i in range(11)), desc="gen")
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    lines = [r.getMessage() for r in caplog.records if r.name == "transfgu.progress"]
    assert [line.split(" in ")[0] for line in lines] == [f"gen: {n} it" for n in (1, 2, 4, 8, 11)]
    assert lines[-1].endswith("loss 10.0")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_lines_are_at_least_min_seconds_apart_and_short_loops_stay_silent(monkeypatch, caplog):
    """Default 10 %, 10 s: a line at a 10 % mark only when 10 s have passed since the previous one; the end gets a
    line when an earlier one was printed (or the loop took 10 s); a loop faster than that prints nothing."""
    monkeypatch.setenv(prog.PROGRESS_ENV, "lines")
    monkeypatch.delenv(prog.PROGRESS_EVERY_ENV, raising=False)
    monkeypatch.delenv(prog.PROGRESS_SECONDS_ENV, raising=False)
    clock = Clock()
    monkeypatch.setattr(prog, "time", clock)
    caplog.set_level(logging.INFO, logger="transfgu.progress")
    for _ in prog.progress(range(100), desc="fast"):
        clock.now += 0.01
    for _ in prog.progress(range(100), desc="slow"):
        clock.now += 4  # a 10 % mark every 40 s
    for _ in prog.progress(range(100), desc="medium"):
        clock.now += 0.06  # a 10 % mark every 0.6 s: one line per 10 s at most
    lines = [r.getMessage().split(" in ")[0] for r in caplog.records if r.name == "transfgu.progress"]
    assert not [line for line in lines if line.startswith("fast")]
    assert [line for line in lines if line.startswith("slow")] == [f"slow: {n}/100 it ({n}%)" for n in range(10, 101, 10)]
    # 6 s in all: no 10 % mark is 10 s after the start, and the loop is shorter than 10 s
    assert not [line for line in lines if line.startswith("medium")]


def test_off_and_other_ranks_print_nothing(monkeypatch, caplog):
    monkeypatch.setenv(prog.PROGRESS_ENV, "lines")
    caplog.set_level(logging.INFO, logger="transfgu.progress")
    assert list(prog.progress(range(3), disable=True)) == [0, 1, 2]
    monkeypatch.setattr(dist, "is_main", lambda: False)
    assert list(prog.progress(range(3))) == [0, 1, 2]
    assert not [r for r in caplog.records if r.name == "transfgu.progress"]


def test_piped_stderr_has_no_carriage_returns():
    """A stage's log piped to a file: readable lines, one per 10 % (the default), no tqdm redraws."""
    code = ("import logging; from transfgu.progress import progress\n"
            "logging.basicConfig(level=logging.INFO, format='[stage] %(message)s')\n"
            "for _ in progress(range(40), desc='extract', unit='batch', leave=False): pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFGU_PROGRESS")}
    env[prog.PROGRESS_SECONDS_ENV] = "0"  # every 10 %, however fast the loop
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 10 and lines[0].startswith("[stage] extract: 4/40 batch (10%) in ")
    assert lines[-1].startswith("[stage] extract: 40/40 batch (100%) in ")
