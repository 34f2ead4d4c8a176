"""Real processes for fault tests: ``dask scheduler``, ``dask worker`` and ``simcal run``.

Everything listens on 127.0.0.1 with free ports. Each process runs in its own session
(process group), so a test can signal the whole group it started and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DASK = str(Path(sys.executable).with_name("dask"))
SIMCAL = [sys.executable, "-m", "simcal.cli"]
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.25
) -> object:
    """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DASK_SCHEDULER_ADDRESS", None)
    env.pop("SIMCAL_STORAGE", None)
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """A started process, its log file, and how to signal or stop it."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def says(self, text: str) -> bool:
        """Whether the output so far contains ``text``; fails if the process already exited."""
        if text in self.output():
            return True
        assert self.alive(), f"{self.name} exited early:\n{self.output()[-4000:]}"
        return False

    def signal(self, signum: int, *, group: bool = False) -> None:
        """Send ``signum`` to the process, or to its whole process group."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.pid, signum)
            else:
                os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit status; fails the test (with the log tail) if it does not exit in time."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tail = self.output()[-4000:]
            message = f"{self.name} still running after {timeout:.0f}s:\n{tail}"
            raise AssertionError(message) from None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process group, SIGKILL it if it does not exit within ``timeout``."""
        if self.alive():
            self.signal(signal.SIGTERM, group=True)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL, group=True)
                self.popen.wait(timeout=30)
        # stragglers of the group (e.g. worker processes of a SIGKILLed driver)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def start(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start ``argv`` in a new session with stdout and stderr to ``log_dir/<name>.log``."""
    log = log_dir / f"{name}.log"
    with log.open("ab") as handle:
        popen = subprocess.Popen(
            list(argv),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(env),
            cwd=cwd,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def start_scheduler(
    log_dir: Path, env: Mapping[str, str] | None = None, timeout: float = 90, port: int = 0
) -> tuple[Proc, str]:
    """A ``dask scheduler`` on ``port`` (a free one if 0; no dashboard); returns it and its
    address."""
    port = port or free_port()
    proc = start(
        f"scheduler-{port}",
        [DASK, "scheduler", "--host", HOST, "--port", str(port), "--no-dashboard"],
        log_dir,
        env,
    )

    def up() -> bool:
        if not proc.alive():
            raise AssertionError(f"scheduler exited early:\n{proc.output()[-4000:]}")
        return _listening(port)

    wait_until(up, timeout, "the scheduler to listen")
    return proc, f"tcp://{HOST}:{port}"


def start_workers(
    address: str,
    log_dir: Path,
    *,
    nworkers: int = 1,
    memory_limit: str = "0",
    name: str = "workers",
    env: Mapping[str, str] | None = None,
) -> Proc:
    """``dask worker`` with ``nworkers`` single-threaded worker processes, each with a nanny."""
    return start(
        f"{name}-{free_port()}",
        [
            DASK, "worker", address, "--host", HOST, "--nthreads", "1",
            "--nworkers", str(nworkers), "--memory-limit", memory_limit, "--no-dashboard",
            "--death-timeout", "60",
        ],
        log_dir,
        env,
    )


def simcal_run(
    config: Path,
    log_dir: Path,
    *args: str,
    name: str = "driver",
    env: Mapping[str, str] | None = None,
) -> Proc:
    """``simcal run --config`` in the background, no metrics server or dashboard unless asked."""
    argv = [*SIMCAL, "--log-level", "DEBUG", "run", "--config", str(config)]
    if "--metrics-port" not in args:
        argv += ["--metrics-port", "0"]
    if "--scheduler" not in args and "--dashboard-address" not in args:
        argv += ["--dashboard-address", f"{HOST}:0"]
    return start(name, [*argv, *args], log_dir, env, cwd=log_dir)


@contextlib.contextmanager
def stopping(*procs: Proc) -> Iterator[list[Proc]]:
    """Stop every process in the list (and those appended to it) when the block ends."""
    started = list(procs)
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.stop()


# -- the stored study --------------------------------------------------------------------------


_STORAGES: dict[str, object] = {}


STUDY_OPEN = "trials already done"  # the driver's log line once its storage is set up


def stored_trials(storage: str, study: str) -> list:
    """Every stored trial of ``study`` (an empty list while the study does not exist yet).

    Opening an Optuna storage writes its version rows: while a driver may be creating the
    tables, wait for :data:`STUDY_OPEN` in its output before calling this.
    """
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if storage not in _STORAGES:
            _STORAGES[storage] = optuna.storages.RDBStorage(storage, skip_table_creation=True)
        loaded = optuna.load_study(study_name=study, storage=_STORAGES[storage])
        return loaded.get_trials(deepcopy=False)
    except (KeyError, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        return []  # not created yet, or the driver holds the SQLite lock right now


def finished(trials: list) -> list:
    """Trials told complete or failed for a reason of their own (those counted)."""
    from optuna.trial import TrialState

    return [
        t
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.FAIL)
        and t.user_attrs.get("fail_reason") != "interrupted"
    ]


def assert_no_loss(trials: list, max_trials: int) -> None:
    """Exactly ``max_trials`` counted, nothing left RUNNING or WAITING, every interruption retried.

    Optuna refuses to tell a finished trial again, and every trial number is stored once.
    An interrupted trial that ran (every parameter stored, or fixed as a popped retry) is
    retried with the same parameters until a retry finishes; one killed mid-ask never ran
    and has nothing to retry (``simcal.storage.retry_params``).
    """
    from optuna.trial import TrialState

    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "a trial number is stored twice"
    open_ = [(t.number, t.state.name) for t in trials if not t.state.is_finished()]
    assert not open_, f"trials left open: {open_}"
    counted = finished(trials)
    assert len(counted) == max_trials, f"{len(counted)} counted trials, expected {max_trials}"
    for trial in counted:
        assert "duration_seconds" in trial.user_attrs, f"trial {trial.number} not told by simcal"
    interrupted = [t for t in trials if t.user_attrs.get("fail_reason") == "interrupted"]
    assert all(t.state == TrialState.FAIL for t in interrupted)
    retries = {t.user_attrs.get("retry_of"): t for t in trials if "retry_of" in t.user_attrs}
    names = set().union(*(t.params.keys() for t in counted))
    for trial in interrupted:
        if trial.user_attrs.get("surplus"):  # asked over the budget, never ran (simcal.trials)
            assert trial.number not in retries, f"surplus trial {trial.number} was retried"
            continue
        ran = _ran_with(trial, names)
        if not ran:
            assert trial.number not in retries, f"trial {trial.number} never ran, yet was retried"
            continue
        retry = retries.get(trial.number)
        while retry is not None and retry.user_attrs.get("fail_reason") == "interrupted":
            retry = retries.get(retry.number)  # a retry interrupted in turn
        assert retry is not None, f"interrupted trial {trial.number} was never retried"
        assert retry.params == ran, f"retry of {trial.number} has other params"


def _ran_with(trial: object, names: set[str]) -> dict:
    """The parameters an interrupted trial ran with; empty if it was killed mid-ask."""
    params = {**(trial.system_attrs.get("fixed_params") or {}), **trial.params}
    return params if names <= params.keys() else {}
