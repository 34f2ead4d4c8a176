"""Calibration progress: a rich bar on a terminal, else a log line every few seconds."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simcal.metrics import TrailingWindow

log = logging.getLogger("simcal")
RATE_WINDOW_SECONDS = 60.0


def trials_per_minute(completed: float, seconds: float) -> float:
    """THE throughput definition: trials completed in a window of wall time, per minute of it.

    Failed and interrupted trials do not count. The progress line applies it to the trailing
    minute while running and to the whole run on its last line; the JSON summary's
    ``trials_per_minute`` applies it to the whole run, so the two agree at the end.
    """
    return completed * 60.0 / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class Snapshot:
    """What the progress display shows."""

    done: int
    total: int
    failed: int
    inflight: int
    best_loss: float
    completed_this_run: int = 0
    elapsed: float = 0.0  # seconds since this run started


class ProgressReporter:
    """Shows :class:`Snapshot` updates; a bar on a TTY, periodic log lines elsewhere."""

    def __init__(
        self,
        *,
        interactive: bool | None = None,
        log_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.log_interval = log_interval
        self._window = TrailingWindow(RATE_WINDOW_SECONDS, clock)
        self._seen_completed = 0
        self._last_log = 0.0
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressReporter:
        if self.interactive:
            self._bar = Progress(
                TextColumn("[bold]calibrating"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("trials", total=None, status="")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def rate(self, snapshot: Snapshot, *, whole_run: bool = False) -> float:
        """Trials per minute: over the trailing minute (or the run so far, if shorter)."""
        if whole_run:
            return trials_per_minute(snapshot.completed_this_run, snapshot.elapsed)
        return trials_per_minute(self._window.total(), self._window.span())

    def update(self, snapshot: Snapshot, *, force: bool = False) -> None:
        """Show a snapshot; ``force`` (the run's last line) shows the whole run's rate."""
        if snapshot.completed_this_run > self._seen_completed:
            self._window.add(snapshot.completed_this_run - self._seen_completed)
            self._seen_completed = snapshot.completed_this_run
        window = "run" if force else "1 min"
        status = (
            f"{self.rate(snapshot, whole_run=force):7.1f} trials/min ({window})  "
            f"best {snapshot.best_loss:.5g}  failed {snapshot.failed}  "
            f"in flight {snapshot.inflight}"
        )
        self.show(snapshot, status, force=force)

    def show(self, snapshot: Snapshot, status: str, *, force: bool = False) -> None:
        """Draw one update (``status``: rate, best, failed, in flight): the bar, or a log line
        every ``log_interval`` seconds (and the last one, ``force``)."""
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task, completed=snapshot.done, total=snapshot.total, status=status
            )
            return
        now = time.monotonic()
        if force or now - self._last_log >= self.log_interval:
            self._last_log = now
            log.info("trials %d/%d  %s", snapshot.done, snapshot.total, status)
