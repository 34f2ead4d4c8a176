"""Checks of a short calibration run by separate processes (or containers): the driver's exit
status and JSON summary, and the stored study. Shared by the image and manifest smoke tests."""

from __future__ import annotations

import json
import math
import subprocess
from typing import Any

from processes import Proc, assert_no_loss, stored_trials


def driver_summary(result: subprocess.CompletedProcess, *procs: Proc) -> dict[str, Any]:
    """The driver's JSON summary (its stdout), after asserting it exited 0; on failure the
    message has the driver's output and the tail of each process log."""
    logs = "\n".join(f"--- {p.name}:\n{p.output()[-2000:]}" for p in procs)
    assert result.returncode == 0, (
        f"driver exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}\n{logs}"
    )
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def assert_calibrated(
    summary: dict[str, Any], storage: str, study: str, trials: int, workers: int
) -> None:
    """Every trial completed on all ``workers``, with a finite best loss, and stored once."""
    assert summary["study"] == study, summary
    assert summary["n_completed"] == trials and summary["n_failed"] == 0, summary
    assert summary["workers"] == workers, summary
    assert summary["this_run"]["stop_reason"] == "max_trials", summary
    assert math.isfinite(summary["best_loss"]), summary
    assert_no_loss(stored_trials(storage, study), trials)
