"""Optuna RDB storage: open a study on a URL; passwords in URLs redacted.

Any SQLAlchemy URL works (SQLite by default, PostgreSQL on Kubernetes). Passwords in
URLs never leave this module unredacted. The stored trials' lifecycle (telling, retries,
recovery of a dead driver's trials) is :mod:`simcal.trials`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import weakref
from pathlib import Path
from urllib.parse import quote, quote_plus

import optuna
import sqlalchemy.event
import sqlalchemy.exc
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

_ENGINES: weakref.WeakSet[sqlalchemy.engine.Engine] = weakref.WeakSet()  # close_storages

_SECRET_QUERY_KEYS = ("password", "passwd", "pwd")
# libpq waits forever for a server that accepts the connection but never answers.
POSTGRES_CONNECT_TIMEOUT = 10


class StorageError(RuntimeError):
    """Storage cannot be opened or written; the message never contains a password."""


class StorageURLError(StorageError):
    """The storage URL is malformed or names a database without its driver: a usage error."""


class MissingStorageError(StorageURLError):
    """A storage to read does not exist, or its URL cannot be read (read-only commands)."""


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


def open_existing(url: str) -> optuna.storages.RDBStorage:
    """An existing storage, to read: never creates a database file or tables (a mistyped
    SQLite path is an error, not a new empty database)."""
    try:
        parsed = make_url(url)
    except Exception:
        raise MissingStorageError(f"invalid storage URL {redact(url)!r}") from None
    database = parsed.database
    local = parsed.drivername.startswith("sqlite") and database not in (None, "", ":memory:")
    if local and not Path(str(database)).is_file():
        raise MissingStorageError(
            f"storage {redact(url)}: the SQLite file {database} does not exist"
        )
    try:
        storage = optuna.storages.RDBStorage(connect_url(url), skip_table_creation=True)
    except Exception as exc:
        raise StorageError(f"cannot read {redact(url)}: {type(exc).__name__}") from None
    _ENGINES.add(storage.engine)
    return storage


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
        return _create_study(url, engine_kwargs, study_name, sampler)
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


def _create_study(
    url: str,
    engine_kwargs: dict[str, object],
    study_name: str,
    sampler: optuna.samplers.BaseSampler,
    attempts: int = 5,
) -> optuna.Study:
    """Create the tables and the study, or load them. Drivers started together race to create
    the tables ("already exists") or the study (unique name): the loser tries again and loads."""
    for attempt in range(1, attempts + 1):
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, skip_table_creation=False
            )
            _ENGINES.add(storage.engine)
            _tune_sqlite(storage.engine)
            return optuna.create_study(
                study_name=study_name,
                storage=storage,
                sampler=sampler,
                direction="minimize",
                load_if_exists=True,
            )
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            # StorageInternalError wraps SQLAlchemy's error; SQLAlchemy's wraps the driver's
            errors = (exc, exc.__cause__)
            raced = any(isinstance(e, sqlalchemy.exc.IntegrityError) for e in errors) or any(
                "already exists" in str(e) for e in errors
            )
            if not raced or attempt == attempts:
                raise
            log.info("another driver is creating the storage; retrying (%s)", type(exc).__name__)
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def close_storages() -> None:
    """Close the connections of every database storage this process opened: SQLite then
    checkpoints its write-ahead log into the database file (``simcal.db`` alone is whole, to
    copy or ``kubectl cp``), PostgreSQL sees them closed, not dropped. For an exit that skips
    the interpreter's teardown (:func:`simcal.cli.entry`), which used to close them."""
    for engine in list(_ENGINES):
        with contextlib.suppress(Exception):  # exiting: a storage gone already is no error
            engine.dispose()


def _sqlite_pragmas(connection: object, _record: object) -> None:
    cursor = connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _tune_sqlite(engine: sqlalchemy.engine.Engine) -> None:
    """SQLite in write-ahead-log mode with ``synchronous=NORMAL`` (docs/performance.md).

    A commit appends to the log without an fsync; checkpoints fsync. A killed process loses
    nothing committed (the log is in the OS's page cache); a power loss or kernel crash may
    lose the last commits before a checkpoint, never the database's consistency. Readers do
    not block the writer. Every new connection gets the pragmas; the pool is emptied so the
    connection Optuna used to create the tables does not keep the old settings.
    """
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return
    sqlalchemy.event.listen(engine, "connect", _sqlite_pragmas)
    engine.dispose()
