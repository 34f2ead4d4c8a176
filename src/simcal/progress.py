"""Calibration progress: a rich bar on a terminal, else a log line every few seconds."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger("simcal")


@dataclass(frozen=True)
class Snapshot:
    """What the progress display shows."""

    done: int
    total: int
    failed: int
    inflight: int
    trials_per_minute: float
    best_loss: float


class ProgressReporter:
    """Shows :class:`Snapshot` updates; a bar on a TTY, periodic log lines elsewhere."""

    def __init__(self, *, interactive: bool | None = None, log_interval: float = 5.0) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.log_interval = log_interval
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

    def update(self, snapshot: Snapshot, *, force: bool = False) -> None:
        status = (
            f"{snapshot.trials_per_minute:7.1f} trials/min  best {snapshot.best_loss:.5g}  "
            f"failed {snapshot.failed}  in flight {snapshot.inflight}"
        )
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task, completed=snapshot.done, total=snapshot.total, status=status
            )
            return
        now = time.monotonic()
        if force or now - self._last_log >= self.log_interval:
            self._last_log = now
            log.info("trials %d/%d  %s", snapshot.done, snapshot.total, status)
