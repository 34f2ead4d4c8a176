"""Optuna RDB storage: open a study, resume interrupted trials, retry transient errors.

Any SQLAlchemy URL works (SQLite by default, PostgreSQL on Kubernetes). Passwords in
URLs never leave this module unredacted.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from simcal.samplers import set_trial_user_attr
from simcal.samplers import trial_id as storage_id

log = logging.getLogger(__name__)
T = TypeVar("T")

FAIL_REASON = "fail_reason"
INTERRUPTED = "interrupted"
RETRY_OF = "retry_of"
_SECRET_QUERY_KEYS = ("password", "passwd", "pwd")
# libpq waits forever for a server that accepts the connection but never answers.
POSTGRES_CONNECT_TIMEOUT = 10


class StorageError(RuntimeError):
    """Storage cannot be opened or written; the message never contains a password."""


class StorageURLError(StorageError):
    """The storage URL is malformed or names a database without its driver: a usage error."""


_EXAMPLES = (
    "e.g. sqlite:///simcal.db (a file here), sqlite:////data/simcal.db (an absolute path) "
    "or postgresql://user@host:5432/db"
)
_POSTGRES_SCHEMES = ("postgres", "postgresql")  # postgres://: Heroku's and libpq's spelling


def connect_url(url: str) -> str:
    """The URL to connect with: ``postgres://`` and ``postgresql://`` get psycopg2, the
    driver ``simcal[postgres]`` installs (SQLAlchemy's default PostgreSQL driver may not be)."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if sep and scheme in _POSTGRES_SCHEMES else url


def _shown(url: str) -> str:
    """An unparseable URL as typed, unless it could hold a password (userinfo or query)."""
    if "@" in url or re.search(r"(?i)pass|pwd", url):
        return "<storage URL not shown: it may hold a password>"
    return url


def _secrets(url: str) -> list[str]:
    """The URL's password, in its userinfo or as a ``password=`` query parameter."""
    parsed = make_url(url)
    found = [str(parsed.password)] if parsed.password else []
    for key, value in parsed.query.items():
        if key.lower() in _SECRET_QUERY_KEYS:
            found.extend([value] if isinstance(value, str) else list(value))
    return [secret for secret in found if secret]


def redact(url: str) -> str:
    """The URL with its password (userinfo or ``password=`` query parameter) replaced by ``***``."""
    try:
        parsed = make_url(url)
        hidden = {k: "***" for k in parsed.query if k.lower() in _SECRET_QUERY_KEYS}
        rendered = parsed.update_query_dict(hidden).render_as_string(hide_password=True)
        return rendered.replace("%2A%2A%2A", "***")
    except Exception:
        return _shown(url)


def _scrub(message: str, url: str) -> str:
    """``message`` with the URL's password replaced wherever it stands as a token of its own
    (as userinfo, a query value, or quoted alone), plain or percent-encoded, but not inside
    other words: a password ``p`` must not turn ``import`` into ``im***ort``."""
    try:
        secrets = _secrets(url)
    except Exception:
        return message
    for secret in secrets:
        for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
            token = rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])"
            message = re.sub(token, "***", message)
    return message


def _check_sqlite_path(url: str) -> None:
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return
    directory = Path(parsed.database).resolve().parent
    if not directory.is_dir():
        raise StorageError(
            f"cannot open storage {redact(url)}: directory {directory} does not exist"
        )
    probe = directory / f".simcal-write-test-{time.monotonic_ns()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise StorageError(
            f"cannot open storage {redact(url)}: {directory} is not writable ({exc.strerror})"
        ) from None


def open_study(url: str, study_name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create or load the study; a clear :class:`StorageError` if the storage is unusable."""
    typed, url = url, connect_url(url)
    try:
        make_url(url)
    except Exception:
        raise StorageURLError(
            f"invalid storage URL {_shown(typed)!r}: expected an SQLAlchemy URL, {_EXAMPLES}"
            f"{_sqlite_hint(typed)}"
        ) from None
    _check_sqlite_path(url)
    engine_kwargs: dict[str, object] = {"pool_pre_ping": True}
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        engine_kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT}
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, skip_table_creation=False
        )
        return optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            direction="minimize",
            load_if_exists=True,
        )
    except (
        sqlalchemy.exc.SQLAlchemyError,
        optuna.exceptions.StorageInternalError,
        OSError,
        ImportError,
        RuntimeError,  # e.g. a table schema of another Optuna version
        ValueError,
    ) as exc:
        if isinstance(exc, ImportError) or "Can't load plugin" in str(exc):
            raise StorageURLError(_missing_driver(typed, parsed)) from None
        cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
        lines = str(cause or exc).strip().splitlines() or [type(exc).__name__]
        reason = _scrub(lines[0], url)
        raise StorageError(f"cannot open storage {redact(typed)}: {reason}") from None


def _sqlite_hint(typed: str) -> str:
    """For a file path typed as a URL (``sir.db``, ``sqlite:/sir.db``): the URL meant."""
    if "://" in typed or "@" in typed:
        return ""
    path = typed.removeprefix("sqlite:")
    if path.startswith("/"):
        name = path.lstrip("/")
        return f"; for {name} here write sqlite:///{name}, for /{name} sqlite:////{name}"
    return f"; for the SQLite file {path} write sqlite:///{path}"


def _missing_driver(typed: str, parsed: sqlalchemy.engine.URL) -> str:
    where = f"cannot open storage {redact(typed)}"
    if parsed.get_backend_name() == "postgresql":
        return f"{where}: PostgreSQL needs its driver: pip install 'simcal[postgres]'"
    return (
        f"{where}: no database driver for {parsed.drivername!r} is installed; install one and "
        f"name it in the URL (as in mysql+pymysql://...), or use SQLite or PostgreSQL, {_EXAMPLES}"
    )


def _transient(error: BaseException | None) -> BaseException | None:
    """The database error behind ``error`` if retrying may help (lock, lost connection).

    Optuna wraps the SQLAlchemy errors raised inside its sessions in ``StorageInternalError``;
    a query after a dropped connection raises ``PendingRollbackError`` (Optuna rolls back).
    """
    if isinstance(error, optuna.exceptions.StorageInternalError):
        return _transient(error.__cause__)
    if isinstance(error, sqlalchemy.exc.PendingRollbackError):
        return _transient(error.__cause__ or error.__context__) or error
    if isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return error
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return error
    return None


def _reason(error: BaseException) -> str:
    """The database driver's one-line reason (no URL in it, so no password)."""
    orig = getattr(error, "orig", None) or error
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0][:200]}" if lines else type(orig).__name__


def with_retries(
    operation: Callable[[], T],
    *,
    what: str,
    attempts: int = 8,
    first_delay: float = 0.2,
    max_delay: float = 10.0,
) -> T:
    """Run a storage operation, retrying transient database errors with exponential backoff.

    With the defaults the attempts span about 25 s of waiting (plus each attempt's own
    timeouts): enough for a locked SQLite file or a restarting PostgreSQL server.
    """
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            error = _transient(exc)
            if error is None:
                raise
            if attempt == attempts:
                raise StorageError(
                    f"{what} failed after {attempts} attempts: {_reason(error)}"
                ) from None
            log.warning("%s failed (%s); retrying in %.1fs", what, _reason(error), delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


def tell(
    study: optuna.Study,
    trial: optuna.Trial,
    value: float | None = None,
    *,
    state: TrialState | None = None,
    what: str = "tell",
) -> None:
    """``study.tell`` with retries. A retry skips a trial that is already finished: the
    attempt before it committed, then lost its connection before hearing so."""
    attempts = 0

    def once() -> None:
        nonlocal attempts
        attempts += 1
        study.tell(trial, value, state=state, skip_if_finished=attempts > 1)

    with_retries(once, what=what)


def recover_interrupted(study: optuna.Study, names: Collection[str]) -> list[int]:
    """Fail trials a killed driver left RUNNING and enqueue their parameters again.

    ``names`` are the study's parameter names (see :func:`retry_params`). Returns the
    numbers of the recovered trials. One driver per study is assumed: at start, every
    RUNNING trial is an orphan.
    """
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in orphans:
        requeue(study, frozen.number, storage_id(frozen), retry_params(frozen, names))
    return [frozen.number for frozen in orphans]


def retry_params(frozen: FrozenTrial, names: Collection[str]) -> dict[str, Any]:
    """The parameters an interrupted trial ran with, all of ``names``, or ``{}`` if it never ran.

    A trial is submitted only once its ask stored every parameter, so a trial killed
    mid-ask (none or some stored) did no work and has nothing to retry. A popped retry
    killed before its parameters were stored still holds them as Optuna's ``fixed_params``.
    """
    params = {**(frozen.system_attrs.get("fixed_params") or {}), **frozen.params}
    return params if set(names) <= params.keys() else {}


def requeue(study: optuna.Study, number: int, trial_id: int, params: dict[str, Any]) -> None:
    """Mark a trial failed as interrupted (not counted) and enqueue its parameters again.

    A trial killed before its parameters were stored has nothing to retry (``params`` empty).
    """
    if params:
        study.enqueue_trial(params, user_attrs={RETRY_OF: number}, skip_if_exists=False)
    mark_interrupted(study, number, trial_id)


def mark_interrupted(study: optuna.Study, number: int, trial_id: int) -> None:
    """Tell a trial failed as interrupted: it does not count towards ``max_trials``."""
    set_trial_user_attr(study, trial_id, FAIL_REASON, INTERRUPTED)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)  # retried as a whole


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``max_trials``: completed, or failed for a reason of their own."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    return sum(1 for t in trials if t.user_attrs.get(FAIL_REASON) != INTERRUPTED)
