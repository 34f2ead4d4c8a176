"""Driver leases under clock skew: two real ``simcal run`` processes on one study, one of them
with its clock 120 s ahead or behind (libfaketime, Debian's ``faketime``).

Lease ages never compare two hosts' clocks (simcal.trials.LeaseObserver): while both drivers
live, neither takes the other's trials; once the skewed one is SIGKILLed, the survivor
recovers its trials within ``lease_grace`` (plus a poll) of the death, and the accounting is
exact. On SQLite (the "database clock" is each driver's own: SQLite runs in-process, and
faketime fakes it too) and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import require, write_config
from processes import (
    STUDY_OPEN,
    finished,
    simcal_run,
    start_scheduler,
    start_workers,
    stopping,
    stored_trials,
    wait_until,
)

MAX_TRIALS = 120  # enough that neither driver is done before the kill
LEASE_GRACE = 4.0
LEASE_INTERVAL = 1.0
# the survivor sees the last renewal within a recovery period, judges the lease dead after
# lease_grace of it unchanged, and claims at its next recovery; the rest is a loaded machine
RECOVERY_BOUND = LEASE_GRACE + 3 * LEASE_INTERVAL + 8.0
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


# libfaketime with the wall clock skewed and the monotonic clock left alone fails Python's
# time.sleep (clock_nanosleep on the monotonic clock: "OSError: [Errno 22] Invalid argument");
# with the monotonic clock faked too, threading.Event.wait never returns (the lease thread
# stopped renewing). Hosts' clocks disagree in wall time, each monotonic clock is its own
# anyway: so only the wall clock is skewed, and the skewed driver sleeps with a timed wait.
SLEEP_SHIM = """import threading, time

_never = threading.Event()


def _sleep(seconds):
    if seconds > 0:
        _never.wait(seconds)


time.sleep = _sleep
"""


def _skewed_env(tmp_path: Path, seconds: int) -> dict[str, str]:
    require(
        shutil.which("faketime") and LIBFAKETIME.exists(),
        "faketime is not installed (make system-deps)",
    )
    site = tmp_path / "faketime-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLEEP_SHIM)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"{seconds:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": path,
    }


def _two_drivers_one_skewed(tmp_path: Path, storage: str, study: str, skew: int) -> None:
    config = write_config(
        tmp_path,
        study=study,
        max_trials=MAX_TRIALS,
        replicates=2,
        model_options={"duration": 0.3},
        sampler="random",
        lease_interval=LEASE_INTERVAL,
        lease_grace=LEASE_GRACE,
    )
    with stopping() as procs:
        scheduler, address = start_scheduler(tmp_path)
        procs.append(scheduler)
        procs.append(start_workers(address, tmp_path, nworkers=3))

        def driver(name: str, env: dict[str, str] | None = None):
            proc = simcal_run(
                config, tmp_path, "--scheduler", address, "--storage", storage,
                "--min-workers", "3", "--summary", str(tmp_path / f"{name}.json"), name=name,
                env=env,
            )
            procs.append(proc)
            return proc

        skewed, normal = driver("skewed", _skewed_env(tmp_path, skew)), driver("normal")
        wait_until(lambda: skewed.says(STUDY_OPEN) and normal.says(STUDY_OPEN), 240, "drivers")
        both_up = time.monotonic()

        def both_telling_a_while() -> bool:
            trials = stored_trials(storage, study)
            runs = {t.user_attrs.get("run_id") for t in finished(trials)}
            running = [t for t in trials if t.state == TrialState.RUNNING]
            overlap = time.monotonic() - both_up > 2.5 * LEASE_GRACE  # each watched the other
            assert skewed.alive(), f"finished before the kill:\n{skewed.output()[-2000:]}"
            return overlap and len(runs) >= 2 and bool(running)

        wait_until(both_telling_a_while, 240, "both drivers telling trials for a while")
        skewed.signal(signal.SIGKILL, group=True)
        assert skewed.wait(30) == -signal.SIGKILL
        killed_at = time.time()  # this process's clock, as the survivor's (unskewed)
        assert normal.wait(300) == 0, normal.output()[-4000:]

    summary = json.loads((tmp_path / "normal.json").read_text())
    survivor = summary["this_run"]["run_id"]
    assert "Traceback" not in normal.output(), normal.output()[-4000:]
    trials = stored_trials(storage, study)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert not [t.number for t in trials if not t.state.is_finished()], "trials left open"
    counted = finished(trials)
    assert MAX_TRIALS <= len(counted) <= MAX_TRIALS + 1, len(counted)

    # no live driver's trials were taken: the survivor lost none, and the skewed driver lost
    # none while it lived
    assert summary["this_run"]["dropped_told_by_another_driver"] == 0, summary
    assert summary["this_run"]["interrupted"] == 0, summary
    interrupted = [t for t in trials if t.user_attrs.get("fail_reason") == "interrupted"
                   and not t.user_attrs.get("surplus")]
    assert all(t.user_attrs.get("run_id") != survivor for t in interrupted), interrupted
    assert interrupted, "the killed driver left nothing to recover"
    delays = [t.datetime_complete.timestamp() - killed_at for t in interrupted]
    assert min(delays) > 0, f"a live driver's trials were taken: {delays}"
    # ... and the dead driver's trials were recovered within lease_grace of its death
    assert max(delays) < RECOVERY_BOUND, f"recovered {max(delays):.1f} s after the kill"
    assert summary["this_run"]["recovered_from_other_drivers"] == len(interrupted)
    retries = {t.user_attrs.get("retry_of") for t in trials if "retry_of" in t.user_attrs}
    names = set().union(*(t.params.keys() for t in trials if t.state == TrialState.COMPLETE))
    ran = [t for t in interrupted
           if names <= {**(t.system_attrs.get("fixed_params") or {}), **t.params}.keys()]
    assert {t.number for t in ran} <= retries, "an interrupted trial was never retried"
    print(
        f"\n{study} (skew {skew:+d} s): {len(counted)} counted of {MAX_TRIALS}; "
        f"{len(interrupted)} interrupted, all the killed driver's; recovered "
        f"{min(delays):.1f}-{max(delays):.1f} s after the kill (lease_grace {LEASE_GRACE:.0f} s)"
    )


@pytest.mark.parametrize("skew", [120, -120])
def test_a_skewed_clock_takes_no_live_trials_sqlite(tmp_path: Path, skew: int) -> None:
    _two_drivers_one_skewed(tmp_path, f"sqlite:///{tmp_path / 'simcal.db'}", "skew-sqlite", skew)


@pytest.mark.parametrize("skew", [120, -120])
def test_a_skewed_clock_takes_no_live_trials_postgres(
    tmp_path: Path, pg_server: object, skew: int
) -> None:
    database = f"skew_{tmp_path.name.lower()[-20:].replace('-', '_')}"
    pg_server.admin(f"CREATE DATABASE {database} OWNER {pg_server.user}")
    _two_drivers_one_skewed(tmp_path, pg_server.url(database=database), "skew-postgres", skew)
