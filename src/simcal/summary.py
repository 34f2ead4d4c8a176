"""What a study holds, as rows and as a run summary (read back from storage)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from simcal.config import CalibrationConfig
from simcal.driver import RunStats
from simcal.optuna_internals import fast_path
from simcal.progress import trials_per_minute
from simcal.trials import FAIL_REASON, HOST, INTERRUPTED, RETRY_OF, RUN_ID


def trial_row(
    trial: FrozenTrial, config: CalibrationConfig | None = None, best: int | None = None
) -> dict[str, Any]:
    """One stored trial as a flat row: number, state, loss, reason, params, per-target losses.

    With ``config``, parameters and per-target losses come in the config's order; ``best`` is
    the number of the best trial, marked in the ``best`` column.
    """
    row: dict[str, Any] = {
        "best": trial.number == best if best is not None else None,
        "number": trial.number,
        "state": trial.state.name,
        "loss": trial.value if trial.state == TrialState.COMPLETE else None,
        "fail_reason": trial.user_attrs.get(FAIL_REASON),
        "error": trial.user_attrs.get("error"),
        "retry_of": trial.user_attrs.get(RETRY_OF),
        "duration_seconds": trial.user_attrs.get("duration_seconds"),
        "run_id": trial.user_attrs.get(RUN_ID),  # the driver that ran it
        "host": trial.user_attrs.get(HOST),  # its pod ($POD_NAME) or hostname
    }
    params = list(config.parameters) if config else list(trial.params)
    params += [name for name in trial.params if name not in params]
    row.update({f"param_{k}": trial.params[k] for k in params if k in trial.params})
    losses = [f"loss_{t.name}" for t in config.targets] if config else []
    losses += sorted(k for k in trial.user_attrs if k.startswith("loss_") and k not in losses)
    row.update({k: trial.user_attrs[k] for k in losses if k in trial.user_attrs})
    return row


def trial_rows(
    trials: list[FrozenTrial], config: CalibrationConfig | None = None, *, sort: str = "number"
) -> list[dict[str, Any]]:
    """Every trial as a row, the best marked; ``sort="loss"``: completed best first, then
    the rest by number."""
    completed = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = min(completed, key=lambda t: (t.value, t.number)).number if completed else -1
    done = {t.number for t in completed}
    if sort == "loss":
        trials = sorted(
            trials,
            key=lambda t: (0, t.value, t.number) if t.number in done else (1, 0.0, t.number),
        )
    return [trial_row(t, config, best) for t in trials]


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
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    best = min(completed, key=lambda t: t.value) if completed else None
    return {
        "study": study.study_name,
        "n_trials": len(completed) + len(failed) + len(pruned),
        "n_completed": len(completed),
        "n_failed": len(failed),
        "n_pruned": len(pruned),
        "n_interrupted": sum(1 for t in trials if t.user_attrs.get(FAIL_REASON) == INTERRUPTED),
        "best_params": best.params if best else None,
        "best_loss": best.value if best else None,
        "trials_per_minute": study_rate(trials),
        "errors": dict(Counter(t.user_attrs.get(FAIL_REASON, "unknown") for t in failed)),
        # the storage and sampler path a run takes: false means a slower path than simcal's own
        "fast_path": fast_path(study),
        "this_run": {
            "run_id": stats.run_id,
            "host": stats.host,
            "completed": stats.completed,
            "failed": stats.failed,
            "pruned": stats.pruned,
            "interrupted": stats.interrupted,
            "recovered_from_other_drivers": stats.recovered,
            "dropped_told_by_another_driver": stats.taken_over,
            "errors": stats.errors,
            "elapsed_seconds": round(stats.elapsed, 3),
            "trials_per_minute": round(trials_per_minute(stats.completed, stats.elapsed), 3),
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
