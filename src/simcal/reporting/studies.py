"""Reading a storage without changing it: open it, find a study, list the studies in it.

Read-only commands (``results``, ``studies``, ``report``) open storage through here, so a
mistyped SQLite path is an error instead of a new empty database file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from simcal.config import ConfigError
from simcal.storage import MissingStorageError, StorageError, open_existing, redact
from simcal.trials import FAIL_REASON, INTERRUPTED


class MissingStudyError(ConfigError):
    """The storage or the study named does not exist (bad input: exit 2)."""


@dataclass(frozen=True)
class StudyListing:
    """One study in a storage: its trial counts and best loss."""

    name: str
    completed: int
    failed: int
    interrupted: int
    running: int
    best_loss: float | None


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An existing storage (:func:`simcal.storage.open_existing`); a missing one is bad input."""
    try:
        return open_existing(url)
    except MissingStorageError as exc:
        raise MissingStudyError(str(exc)) from None


def study_names(storage: optuna.storages.RDBStorage) -> list[str]:
    try:
        return sorted(study.study_name for study in storage.get_all_studies())
    except Exception as exc:
        raise StorageError(f"cannot list studies: {type(exc).__name__}") from None


def load_existing_study(url: str, name: str) -> optuna.Study:
    """The study ``name``; if it is missing, the error lists the studies that exist."""
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = study_names(storage)
        listing = ", ".join(names) if names else "none"
        raise MissingStudyError(
            f"no study {name!r} in {redact(url)}; studies there: {listing}"
        ) from None
    except Exception as exc:
        raise StorageError(f"cannot read {redact(url)}: {type(exc).__name__}") from None


def list_studies(url: str) -> list[StudyListing]:
    """Every study in the storage with its trial counts and best loss, by name."""
    storage = open_storage(url)
    listings = []
    for name in study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        completed = [t.value for t in trials if t.state == TrialState.COMPLETE]
        interrupted = sum(1 for t in trials if t.user_attrs.get(FAIL_REASON) == INTERRUPTED)
        failed = sum(1 for t in trials if t.state == TrialState.FAIL) - interrupted
        running = sum(1 for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING))
        finite = [v for v in completed if v is not None and math.isfinite(v)]
        best = min(finite) if finite else None
        listings.append(
            StudyListing(name, len(completed), failed, interrupted, running, best)
        )
    return listings
