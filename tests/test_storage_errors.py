"""Scenario 6: storage that cannot be opened fails at start, clearly; transient database
errors during a run are retried with backoff; the storage password never shows.

Everything is real: a closed port, a server that accepts and never answers, directories
and files the process may not write (as an unprivileged user when the tests run as root),
an SQLite file locked by another connection's exclusive transaction, and a PostgreSQL
server restarted in the middle of a ``simcal run``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import sqlalchemy.exc
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import require, run_simcal, write_config
from pgserver import postgres_bin, postgres_server
from processes import HOST, free_port, simcal_run, stopping, wait_until
from simcal.samplers import make_sampler
from simcal.storage import MissingStorageError, StorageError, open_existing, open_study, redact
from simcal.trials import with_retries

PASSWORD = "s3cret-Zq81x"  # distinctive: a plain substring search finds any leak
NOBODY = 65534


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output, output[-3000:]


@contextlib.contextmanager
def _closed_port() -> Iterator[int]:
    """A port bound but not listening: connections are refused, nobody else can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        yield int(sock.getsockname()[1])


# -- failing at start ------------------------------------------------------------------------


def test_unreachable_postgres_fails_at_start_without_the_password(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with _closed_port() as port:
        url = f"postgresql+psycopg2://simcal:{PASSWORD}@{HOST}:{port}/simcal"
        started = time.monotonic()
        result = run_simcal(
            "run", "--config", str(config), "--storage", url, "--metrics-port", "0", timeout=120
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "simcal: error: cannot open storage" in result.stderr
    assert f"simcal:***@{HOST}" in result.stderr  # the URL is named, redacted
    assert "Connection refused" in result.stderr
    assert PASSWORD not in output
    _no_traceback(output)
    assert "starting a local cluster" not in output  # failed before starting anything
    assert time.monotonic() - started < 60


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        listener.close()


def test_database_that_never_answers_times_out_at_start(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with _silent_server() as port:
        url = f"postgresql+psycopg2://simcal:{PASSWORD}@{HOST}:{port}/simcal"
        started = time.monotonic()
        result = run_simcal(
            "run", "--config", str(config), "--storage", url, "--metrics-port", "0", timeout=120
        )
        elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "cannot open storage" in result.stderr and "timeout" in result.stderr, output
    assert PASSWORD not in output
    _no_traceback(output)
    assert elapsed < 60  # libpq's connect_timeout, not a hang


def _unprivileged(argv: list[str]) -> list[str]:
    """Run as nobody when root (root may write anywhere), as the current user otherwise."""
    if os.geteuid() == 0:
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]
    return argv


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="simcal-storage-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.rglob("*"):
            with contextlib.suppress(OSError):
                child.chmod(0o755 if child.is_dir() else 0o644)
        path.chmod(0o755)
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def _run_unprivileged(config: Path, cwd: Path) -> tuple[int, str]:
    argv = _unprivileged(
        [sys.executable, "-m", "simcal.cli", "run", "--config", str(config), "--metrics-port", "0"]
    )
    env = {**os.environ, "HOME": str(cwd), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SIMCAL_STORAGE", None)
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    import subprocess

    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env=env, cwd=cwd, check=False
    )
    return result.returncode, result.stdout + result.stderr


def test_unwritable_sqlite_directory_fails_at_start(shared_dir: Path) -> None:
    readonly = shared_dir / "readonly"
    readonly.mkdir()
    config = write_config(shared_dir, storage=f"sqlite:///{readonly / 'simcal.db'}")
    config.chmod(0o644)
    if os.geteuid() != 0:
        readonly.chmod(0o555)
    status, output = _run_unprivileged(config, shared_dir)
    assert status == 1, output
    assert f"cannot open storage sqlite:///{readonly / 'simcal.db'}" in output
    assert f"{readonly} is not writable (Permission denied)" in output
    _no_traceback(output)
    assert not (readonly / "simcal.db").exists()


def test_sqlite_in_a_missing_directory_fails_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    config = write_config(tmp_path, storage=f"sqlite:///{missing / 'simcal.db'}")
    result = run_simcal("run", "--config", str(config), "--metrics-port", "0", timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"directory {missing} does not exist" in result.stderr
    _no_traceback(result.stderr)


def test_reading_opens_only_an_existing_storage(tmp_path: Path) -> None:
    """open_existing (simcal results, studies, report) never creates a database: a missing
    SQLite file and an unreadable URL are MissingStorageError (bad input), and nothing is
    created; an existing file opens without writing tables."""
    missing = tmp_path / "typo.db"
    with pytest.raises(MissingStorageError, match=r"the SQLite file .*typo\.db does not exist"):
        open_existing(f"sqlite:///{missing}")
    assert not missing.exists()
    with pytest.raises(MissingStorageError, match="invalid storage URL"):
        open_existing("not a url at all")
    url = f"sqlite:///{tmp_path / 'made.db'}"
    open_study(url, "s", optuna.samplers.RandomSampler())
    assert open_existing(url).get_all_studies()[0].study_name == "s"


def test_read_only_sqlite_file_fails_at_start(shared_dir: Path) -> None:
    """The directory is writable but the database file is not: SQLite opens it read-only."""
    data = shared_dir / "data"
    data.mkdir()
    data.chmod(0o777)
    database = data / "simcal.db"
    open_study(f"sqlite:///{database}", "synthetic-test", make_sampler("random", 0))
    database.chmod(0o444)
    config = write_config(shared_dir, storage=f"sqlite:///{database}")
    config.chmod(0o644)
    status, output = _run_unprivileged(config, shared_dir)
    assert status == 1, output
    assert "simcal: error: cannot open storage" in output
    assert "readonly database" in output
    _no_traceback(output)


# -- retrying transient errors -----------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(database: Path, seconds: float) -> Iterator[threading.Event]:
    """Another connection holds an exclusive transaction on ``database`` for ``seconds``,
    or until the yielded event is set."""
    acquired, release = threading.Event(), threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(database, isolation_level=None, timeout=30)
        try:
            connection.execute("BEGIN EXCLUSIVE")
            acquired.set()
            release.wait(seconds)
            connection.execute("COMMIT")
        finally:
            connection.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert acquired.wait(30), "could not lock the database"
    try:
        yield release
    finally:
        thread.join(seconds + 30)


def _study(tmp_path: Path, busy_timeout: float) -> tuple[optuna.Study, Path]:
    database = tmp_path / "locked.db"
    url = f"sqlite:///{database}?timeout={busy_timeout}"  # SQLite's busy timeout, seconds
    return open_study(url, "locked", make_sampler("random", 0)), database


def test_with_retries_waits_out_a_locked_sqlite_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study, database = _study(tmp_path, busy_timeout=0.3)
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    with _exclusive_lock(database, seconds=3.0):
        # Without retries the write fails: the lock is real.
        with pytest.raises(optuna.exceptions.StorageInternalError):
            trial.set_user_attr("probe", 1)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="simcal.trials"):
            with_retries(lambda: study.tell(trial, 0.5), what="tell")
        waited = time.monotonic() - started
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries, "the lock caused no retry"
    assert all("tell failed (OperationalError: database is locked)" in m for m in retries)
    delays = [float(m.rsplit("retrying in ", 1)[1].rstrip("s")) for m in retries]
    assert delays == sorted(delays) and delays[0] < delays[-1]  # exponential backoff
    assert waited >= 1.5
    stored = study.get_trials()[0]
    assert stored.state == TrialState.COMPLETE and stored.value == 0.5


def test_with_retries_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    study, database = _study(tmp_path, busy_timeout=0.2)
    trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
    with _exclusive_lock(database, seconds=4.0), pytest.raises(StorageError) as raised:
        with_retries(lambda: study.tell(trial, 0.5), what="tell", attempts=3, first_delay=0.1)
    assert str(raised.value) == "tell failed after 3 attempts: OperationalError: database is locked"
    assert study.get_trials()[0].state == TrialState.RUNNING  # not told: resumable


def test_with_retries_does_not_retry_a_permanent_error(tmp_path: Path) -> None:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    calls = 0

    def insert_duplicate() -> None:
        nonlocal calls
        calls += 1
        with engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (1)")

    with pytest.raises(sqlalchemy.exc.IntegrityError):
        with_retries(insert_duplicate, what="insert", first_delay=0.01)
    assert calls == 1


def _count(database: Path, state: str) -> int:
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=1)) as connection:
            row = connection.execute(
                "SELECT count(*) FROM trials WHERE state = ?", (state,)
            ).fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


def test_run_survives_a_locked_sqlite_database(tmp_path: Path) -> None:
    """``simcal run`` whose SQLite file another process locks for longer than SQLite's
    own busy timeout (5 s): the driver retries and completes every trial."""
    database = tmp_path / "simcal.db"
    config = write_config(
        tmp_path, max_trials=80, replicates=2, model_options={"duration": 0.05}, seed=3
    )
    with stopping(simcal_run(config, tmp_path, "--workers", "2")) as procs:
        driver = procs[0]
        wait_until(lambda: _count(database, "COMPLETE") >= 5 or not driver.alive(), 180, "5 trials")
        assert driver.alive(), driver.output()[-3000:]
        with _exclusive_lock(database, seconds=60.0) as release:
            # held past SQLite's own 5 s busy timeout, until the driver reports its retry
            wait_until(lambda: "database is locked" in driver.output(), 60, "a retry")
            time.sleep(1.0)
            release.set()
        status = driver.wait(240)
    output = driver.output()
    assert status == 0, output[-4000:]
    locked = [line for line in output.splitlines() if "database is locked" in line]
    assert locked, "the driver never ran into the lock"
    # simcal's own lines say it retries; Optuna may log (and absorb) one of its own reads
    ours = [line for line in locked if "Caught an error from sqlalchemy" not in line]
    assert all("; retrying in" in line for line in ours), ours
    _no_traceback(output)
    study = optuna.load_study(study_name="synthetic-test", storage=f"sqlite:///{database}")
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 80
    assert TrialState.RUNNING not in states


# -- PostgreSQL: a restart mid-run, and the password ---------------------------------------------


@pytest.fixture(scope="module")
def private_pg() -> Iterator[object]:
    """A server of this module's own: the restart test stops and starts it."""
    require(postgres_bin(), "PostgreSQL is not installed: run `make system-deps`")
    with postgres_server() as server:
        yield server


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def test_run_survives_a_postgres_restart_and_never_shows_the_password(
    tmp_path: Path, private_pg: object
) -> None:
    server = private_pg
    url = server.url()
    summary = tmp_path / "summary.json"
    config = write_config(
        tmp_path, max_trials=60, replicates=2, model_options={"duration": 0.05}, storage=url
    )
    metrics_port = free_port()
    scrapes: list[str] = []
    args = ["--workers", "2", "--summary", str(summary), "--metrics-host", HOST]
    args += ["--metrics-port", str(metrics_port), "--metrics-linger", "3"]
    with stopping(simcal_run(config, tmp_path, *args)) as procs:
        driver = procs[0]

        def completed() -> int:
            body = _scrape(metrics_port)
            if body:
                scrapes.append(body)
            with contextlib.suppress(Exception):
                study = optuna.load_study(study_name="synthetic-test", storage=url)
                return len(study.get_trials(states=(TrialState.COMPLETE,)))
            return 0

        wait_until(lambda: completed() >= 5 or not driver.alive(), 180, "5 trials")
        assert driver.alive(), driver.output()[-3000:]
        server.stop("fast")  # every connection is dropped
        try:
            # down for at least 3 s, and until the driver met the outage (a call of its own
            # may wait out a short one and succeed on the restarted server: no retry to see)
            time.sleep(3)
            wait_until(lambda: "retrying in" in driver.output() or not driver.alive(), 30,
                       "the driver to retry")
        finally:
            server.start()
        while driver.alive():
            body = _scrape(metrics_port)
            if body:
                scrapes.append(body)
            time.sleep(0.5)
        status = driver.wait(10)
    output = driver.output()
    assert status == 0, output[-4000:]
    assert "retrying in" in output, "the restart caused no retry:\n" + output[-6000:]
    _no_traceback(output)

    study = optuna.load_study(study_name="synthetic-test", storage=url)
    states = [t.state for t in study.get_trials()]
    assert TrialState.RUNNING not in states
    counted = [
        t
        for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.FAIL))
        if t.user_attrs.get("fail_reason") != "interrupted"
    ]
    assert len(counted) == 60
    assert json.loads(summary.read_text())["n_trials"] == 60

    assert scrapes and any("simcal_trials_total" in body for body in scrapes)
    results = run_simcal("results", "--config", str(config), "--format", "json")
    assert results.returncode == 0, results.stderr
    for name, text in [
        ("driver output", output),
        ("summary", summary.read_text()),
        ("metrics", "\n".join(scrapes)),
        ("results", results.stdout + results.stderr),
    ]:
        assert server.password not in text, f"the password appears in the {name}"
    assert redact(url) in summary.read_text()


def test_wrong_postgres_password_fails_clearly_without_either_password(
    tmp_path: Path, private_pg: object
) -> None:
    server = private_pg
    wrong = f"{PASSWORD}-wrong"
    config = write_config(tmp_path, storage=server.url(password=wrong))
    result = run_simcal("run", "--config", str(config), "--metrics-port", "0", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "cannot open storage" in result.stderr
    assert 'password authentication failed for user "simcal"' in result.stderr
    assert wrong not in output and server.password not in output
    _no_traceback(output)

    checked = run_simcal("check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert wrong not in checked.stdout
    assert f"simcal:***@{HOST}:{server.port}" in json.loads(checked.stdout)["storage"]


# -- storage URLs as typed -------------------------------------------------------------------


def test_scrubbing_hides_the_password_not_letters_of_other_words() -> None:
    from simcal.storage import _scrub

    message = "Failed to import DB access module for the specified storage URL (p) p@x"
    url = "mysql://u:p@localhost/db?sslkey=k"
    assert _scrub(message, url) == (
        "Failed to import DB access module for the specified storage URL (***) ***@x"
    )
    encoded = "postgresql://u:a%2Fb@h/db"  # the password a/b
    assert _scrub("dsn user=u password=a/b and a%2Fb", encoded) == (
        "dsn user=u password=*** and ***"
    )
    assert _scrub(f"password={PASSWORD}", f"sqlite:///x.db?password={PASSWORD}") == "password=***"


@pytest.mark.parametrize(
    ("typed", "shown", "suggestion"),
    [
        ("sir.db", "'sir.db'", "sqlite:///sir.db"),
        ("sqlite:/sir.db", "'sqlite:/sir.db'", "sqlite:////sir.db"),
        (f"u:{PASSWORD}@sir", "'<storage URL not shown: it may hold a password>'", "sqlite:///"),
    ],
)
def test_an_invalid_storage_url_is_shown_with_a_correct_example(
    tmp_path: Path, typed: str, shown: str, suggestion: str
) -> None:
    config = write_config(tmp_path)
    result = run_simcal("check-config", str(config))  # the config itself is fine
    assert result.returncode == 0, result.stderr
    result = run_simcal(
        "run", "--config", str(config), "--storage", typed, "--metrics-port", "0", timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert f"invalid storage URL {shown}" in result.stderr and suggestion in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    _no_traceback(result.stderr)


def test_an_unsupported_database_is_named_with_what_to_write(tmp_path: Path) -> None:
    """simcal supports SQLite and PostgreSQL (issue 10); any other backend is refused before
    a driver import can fail with SQLAlchemy's message, and the password stays hidden."""
    config = write_config(tmp_path)
    result = run_simcal(
        "run", "--config", str(config), "--storage", f"mysql://u:{PASSWORD}@localhost/db",
        "--metrics-port", "0", timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "storage backend 'mysql' is not supported" in result.stderr, result.stderr
    assert "sqlite:///PATH or postgresql://" in result.stderr, result.stderr
    assert "import DB access module" not in result.stderr and PASSWORD not in result.stderr


def test_postgresql_without_its_driver_names_the_extra(tmp_path: Path) -> None:
    """psycopg2 made unimportable, as in an install without simcal[postgres]."""
    config = write_config(tmp_path)
    code = (
        "import sys; sys.modules['psycopg2'] = None; sys.modules['psycopg'] = None\n"
        "from simcal.cli import main\n"
        f"sys.exit(main(['run', '--config', {str(config)!r}, '--metrics-port', '0',"
        f" '--storage', 'postgresql://u:{PASSWORD}@127.0.0.1:1/db']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'simcal[postgres]'" in result.stderr
    assert PASSWORD not in result.stderr


def test_postgres_scheme_is_postgresql(tmp_path: Path) -> None:
    """``postgres://`` (libpq's and Heroku's spelling) reaches PostgreSQL like postgresql://."""
    config = write_config(tmp_path)
    with _closed_port() as port:
        result = run_simcal(
            "run", "--config", str(config), "--metrics-port", "0",
            "--storage", f"postgres://u:{PASSWORD}@{HOST}:{port}/db", timeout=120,
        )
    assert result.returncode == 1, result.stderr
    assert "Connection refused" in result.stderr, result.stderr  # tried: the server is down
    assert f"postgres://u:***@{HOST}:{port}/db" in result.stderr and PASSWORD not in result.stderr
