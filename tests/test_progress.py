"""The progress line's throughput: its own trailing window, and on the last line the same
definition and window as the JSON summary."""

from __future__ import annotations

import logging

import optuna
import pytest

from simcal.driver import RunStats
from simcal.progress import ProgressReporter, Snapshot, trials_per_minute
from simcal.summary import summarize


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def snapshot(completed: int, elapsed: float) -> Snapshot:
    return Snapshot(done=completed, total=1000, failed=0, inflight=4, best_loss=1.0,
                    completed_this_run=completed, elapsed=elapsed)


def rate_in(record: logging.LogRecord) -> float:
    return float(record.getMessage().split("trials/min")[0].split()[-1])


def test_last_progress_line_agrees_with_the_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    progress = ProgressReporter(interactive=False, log_interval=0, clock=clock)
    completed = 0
    with caplog.at_level(logging.INFO, logger="simcal"):
        for second in range(1, 181):  # 2 trials/s for two minutes, then 0.5/s for one
            clock.now += 1
            completed += 2 if second <= 120 else (second % 2)
            progress.update(snapshot(completed, second))
        trailing = rate_in(caplog.records[-1])
        progress.update(snapshot(completed, 180), force=True)
    assert trailing == pytest.approx(30.0, abs=2.5)  # the last minute: 0.5 trials/s
    assert "(run)" in caplog.records[-1].getMessage()
    whole_run = rate_in(caplog.records[-1])
    assert whole_run == pytest.approx(completed / 3, abs=0.1)  # 270 trials in 3 minutes
    summary = summarize(
        optuna.create_study(), RunStats(completed=completed, elapsed=180.0), {}
    )
    assert summary["this_run"]["trials_per_minute"] == pytest.approx(whole_run, abs=0.05)
    assert summary["this_run"]["trials_per_minute"] == round(trials_per_minute(completed, 180.0), 3)
