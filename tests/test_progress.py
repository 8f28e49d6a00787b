"""Progress lines: throttled to one per interval, counting items and tokens, only on the main process."""

from __future__ import annotations

import pytest

from stages import progress
from stages.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_interval_with_counts_and_tokens_per_second(capsys):
    clock = Clock()
    bar = Progress("r1/grpo", "sampling", 128, interval=30, clock=clock)
    clock.now += 10
    bar.advance(32, tokens=400)
    assert capsys.readouterr().err == ""  # the first line only after the interval
    clock.now += 21
    bar.advance(32, tokens=840)
    assert capsys.readouterr().err == "[r1/grpo] sampling 64/128 samples, 40 tokens/s, 31s elapsed\n"
    clock.now += 29
    bar.advance(1)
    assert capsys.readouterr().err == ""  # 29 s since the last line
    clock.now += 1
    bar.advance(0)
    assert capsys.readouterr().err == "[r1/grpo] sampling 65/128 samples, 20 tokens/s, 61s elapsed\n"


def test_no_tokens_no_speed_and_the_stage_label_by_default(capsys, monkeypatch):
    monkeypatch.setattr(progress, "stage_label", "p/eval")
    clock = Clock()
    bar = Progress(None, "scoring", 10, unit="rows", interval=5, clock=clock)
    clock.now += 5
    bar.advance(3)
    assert capsys.readouterr().err == "[p/eval] scoring 3/10 rows, 5s elapsed\n"


def test_interval_from_the_environment_and_only_the_main_process_prints(capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    Progress("s", "sampling", 2).advance(1)
    assert capsys.readouterr().err.startswith("[s] sampling 1/2 samples")
    monkeypatch.setenv("RANK", "1")
    Progress("s", "sampling", 2).advance(1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["x", ""])
def test_a_bad_interval_setting_is_refused(monkeypatch, bad):
    monkeypatch.setenv(progress.INTERVAL_ENV, bad)
    with pytest.raises(ValueError):
        Progress("s", "sampling", 2)
