"""Optuna RDB storage: open a study, resume interrupted trials, retry transient errors.

Any SQLAlchemy URL works (SQLite by default, PostgreSQL on Kubernetes). Passwords in
URLs never leave this module unredacted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)
T = TypeVar("T")

FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"


class StorageError(RuntimeError):
    """Storage cannot be opened or written; the message never contains a password."""


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def _scrub(message: str, url: str) -> str:
    try:
        password = make_url(url).password
    except Exception:
        return message
    return message.replace(str(password), "***") if password else message


def _check_sqlite_path(url: str) -> None:
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return
    directory = Path(parsed.database).resolve().parent
    if not directory.is_dir():
        raise StorageError(f"cannot open storage {url}: directory {directory} does not exist")
    probe = directory / f".simcal-write-test-{time.monotonic_ns()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise StorageError(
            f"cannot open storage {url}: {directory} is not writable ({exc.strerror})"
        ) from None


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The optimizer: ``tpe`` (constant liar: many trials in flight), ``random`` or ``cmaes``."""
    if name == "tpe":
        return optuna.samplers.TPESampler(constant_liar=True, multivariate=True, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"unknown sampler {name!r}")


def open_study(url: str, study_name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create or load the study; a clear :class:`StorageError` if the storage is unusable."""
    try:
        make_url(url)
    except Exception:
        raise StorageError(f"invalid storage URL {redact(url)!r}") from None
    _check_sqlite_path(url)
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs={"pool_pre_ping": True}, skip_table_creation=False
        )
        return optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            direction="minimize",
            load_if_exists=True,
        )
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ImportError) as exc:
        reason = _scrub(str(exc).splitlines()[0], url)
        raise StorageError(f"cannot open storage {redact(url)}: {reason}") from None


def with_retries(
    operation: Callable[[], T], *, what: str, attempts: int = 6, first_delay: float = 0.2
) -> T:
    """Run a storage operation, retrying transient database errors with exponential backoff."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except sqlalchemy.exc.OperationalError as exc:
            if attempt == attempts:
                raise StorageError(
                    f"{what} failed after {attempts} attempts: {type(exc.orig).__name__}"
                ) from None
            log.warning("%s failed (%s); retrying in %.1fs", what, type(exc.orig).__name__, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail trials a killed driver left RUNNING and enqueue their parameters again.

    Returns the numbers of the recovered trials. One driver per study is assumed:
    at start, every RUNNING trial is an orphan.
    """
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in orphans:
        requeue(study, frozen.number, frozen._trial_id, frozen.params)
    return [frozen.number for frozen in orphans]


def requeue(study: optuna.Study, number: int, trial_id: int, params: dict[str, float]) -> None:
    """Mark a trial failed as interrupted (not counted) and enqueue its parameters again."""
    study.enqueue_trial(params, user_attrs={RETRY_OF: number}, skip_if_exists=False)
    study._storage.set_trial_user_attr(trial_id, FAIL_REASON, INTERRUPTED)
    study.tell(number, state=TrialState.FAIL)


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``max_trials``: completed, or failed for a reason of their own."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    return sum(1 for t in trials if t.user_attrs.get(FAIL_REASON) != INTERRUPTED)
