"""What a study holds, as rows and as a run summary (read back from storage)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from simcal.driver import RunStats
from simcal.storage import FAIL_REASON, INTERRUPTED


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """One stored trial as a flat row: number, state, loss, reason, params, per-target losses."""
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "loss": trial.value if trial.state == TrialState.COMPLETE else None,
        "fail_reason": trial.user_attrs.get(FAIL_REASON),
        "error": trial.user_attrs.get("error"),
        "retry_of": trial.user_attrs.get("retry_of"),
        "duration_seconds": trial.user_attrs.get("duration_seconds"),
    }
    row.update({f"param_{k}": v for k, v in trial.params.items()})
    row.update({k: v for k, v in trial.user_attrs.items() if k.startswith("loss_")})
    return row


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    """Rows as CSV (union of columns, in first-seen order) or a JSON array."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summarize(study: optuna.Study, stats: RunStats, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON summary of a study after a run: counts over all runs, rates of this one."""
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [
        t
        for t in trials
        if t.state == TrialState.FAIL and t.user_attrs.get(FAIL_REASON) != INTERRUPTED
    ]
    best = min(completed, key=lambda t: t.value) if completed else None
    minutes = stats.elapsed / 60 if stats.elapsed > 0 else math.nan
    return {
        "study": study.study_name,
        "n_trials": len(completed) + len(failed),
        "n_completed": len(completed),
        "n_failed": len(failed),
        "n_interrupted": sum(1 for t in trials if t.user_attrs.get(FAIL_REASON) == INTERRUPTED),
        "best_params": best.params if best else None,
        "best_loss": best.value if best else None,
        "trials_per_minute": study_rate(trials),
        "errors": dict(Counter(t.user_attrs.get(FAIL_REASON, "unknown") for t in failed)),
        "this_run": {
            "completed": stats.completed,
            "failed": stats.failed,
            "interrupted": stats.interrupted,
            "errors": stats.errors,
            "elapsed_seconds": round(stats.elapsed, 3),
            "trials_per_minute": round(stats.completed / minutes, 3) if stats.completed else 0.0,
            "stop_reason": stats.stop_reason,
        },
        **extra,
    }


def study_rate(trials: list[FrozenTrial]) -> float:
    """Completed trials per minute over the time the study's runs ran, pauses between excluded.

    Each run's span is its trials' first start to last finish (trials carry their ``run_id``),
    so a later run that had nothing to do leaves the rate as it was.
    """
    spans: dict[object, list] = {}
    completed = 0
    for trial in trials:
        if trial.state != TrialState.COMPLETE or not trial.datetime_start:
            continue
        completed += 1
        start, end = trial.datetime_start, trial.datetime_complete or trial.datetime_start
        span = spans.setdefault(trial.user_attrs.get("run_id"), [start, end])
        span[0], span[1] = min(span[0], start), max(span[1], end)
    seconds = sum((end - start).total_seconds() for start, end in spans.values())
    return round(completed * 60 / seconds, 3) if seconds > 0 else 0.0
