"""The driver under signals: SIGTERM drains within the grace period, SIGKILL then a re-run resumes.

``simcal run`` runs in a subprocess with its own local cluster (its process group is signalled,
as a pod eviction would); the resume test runs against SQLite and a real PostgreSQL server.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from conftest import SIMCAL, write_config
from processes import (
    STUDY_OPEN,
    assert_no_loss,
    finished,
    simcal_run,
    start,
    stopping,
    stored_trials,
    wait_until,
)
from simcal.models.synthetic import fault_draw

pytestmark = pytest.mark.timeout(900)
WORKERS = "3"


def _without_faults(config: Path) -> None:
    """The fault went away (as after a fixed model): the re-run's retries can finish."""
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["model_options"]["hang_rate"] = 0.0
    config.write_text(yaml.safe_dump(data), encoding="utf-8")


def test_sigterm_tells_what_finishes_in_grace_and_requeues_the_rest(tmp_path: Path) -> None:
    """SIGTERM: no new trials; quick ones told within the grace period, hung ones re-enqueued."""
    study, max_trials, hang_rate, fault_seed = "sigterm", 30, 0.3, 5
    options = {"duration": 1.0, "hang_rate": hang_rate, "hang_seconds": 120, "fault_seed": 5}
    config = write_config(
        tmp_path, study=study, model_options=options, replicates=1, max_trials=max_trials,
        max_in_flight=3, sampler="random",
    )
    storage, summary = f"sqlite:///{tmp_path / 'simcal.db'}", tmp_path / "summary.json"

    def hangs(trial: object) -> bool:
        return fault_draw(trial.params, fault_seed) < hang_rate

    with stopping() as procs:
        driver = simcal_run(
            config, tmp_path, "--workers", WORKERS, "--grace-period", "10",
            "--summary", str(summary),
        )
        procs.append(driver)

        def hung_and_quick_in_flight() -> list | None:
            if not driver.says(STUDY_OPEN):
                return None
            running = [t for t in stored_trials(storage, study) if t.state == TrialState.RUNNING]
            kinds = {hangs(t) for t in running}
            return running if kinds == {True, False} else None

        running = wait_until(hung_and_quick_in_flight, 300, "a hung and a quick trial in flight")
        driver.signal(signal.SIGTERM)  # the driver only: its local cluster stays up to drain
        signalled, signalled_at = time.monotonic(), datetime.datetime.now()
        assert driver.wait(180) == 0, driver.output()[-4000:]
        took = time.monotonic() - signalled

    assert "SIGTERM" in driver.output()
    assert 10 <= took < 150, f"exit {took:.0f}s after SIGTERM with a 10s grace period"
    trials = stored_trials(storage, study)
    told = [t for t in trials if t.state != TrialState.WAITING]
    cutoff = signalled_at + datetime.timedelta(seconds=2)
    late = [t.number for t in told if t.datetime_start > cutoff]
    assert not late, f"trials asked after SIGTERM: {late}"
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    for trial in told:
        if hangs(trial):
            assert trial.user_attrs.get("fail_reason") == "interrupted", trial.user_attrs
        else:
            assert trial.state == TrialState.COMPLETE, (trial.number, trial.user_attrs)
    quick = [t.number for t in running if not hangs(t)]
    by_number = {t.number: t for t in trials}
    assert all(by_number[n].state == TrialState.COMPLETE for n in quick)  # told during grace
    interrupted = sorted(t.number for t in told if hangs(t))
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in waiting) == interrupted
    for retry in waiting:
        fixed = retry.system_attrs["fixed_params"]  # a waiting trial's params-to-be
        assert fixed == by_number[retry.user_attrs["retry_of"]].params
    this_run = json.loads(summary.read_text(encoding="utf-8"))["this_run"]
    assert this_run["stop_reason"] == "signal"
    assert this_run["interrupted"] == len(interrupted) >= 1
    assert len(finished(trials)) < max_trials

    _without_faults(config)
    with stopping() as procs:
        rerun = simcal_run(config, tmp_path, "--workers", WORKERS, name="driver-2")
        procs.append(rerun)
        assert rerun.wait(600) == 0, rerun.output()[-4000:]
    assert_no_loss(stored_trials(storage, study), max_trials)


def _kill_then_resume(tmp_path: Path, storage: str, study: str) -> None:
    max_trials = 20
    config = write_config(
        tmp_path, study=study, model_options={"duration": 0.5}, replicates=2,
        max_trials=max_trials, sampler="random",
        # the re-run recovers the killed driver's trials once its lease is stale
        lease_interval=1.0, lease_grace=4.0,
    )
    with stopping() as procs:
        driver = simcal_run(config, tmp_path, "--workers", WORKERS, "--storage", storage)
        procs.append(driver)

        def some_told_some_running() -> bool:
            if not driver.says(STUDY_OPEN):
                return False
            trials = stored_trials(storage, study)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            return len(finished(trials)) >= 3 and bool(running)

        wait_until(some_told_some_running, 300, "3 told trials and some in flight")
        driver.signal(signal.SIGKILL, group=True)  # the driver and its local cluster
        assert driver.wait(60) == -signal.SIGKILL

    orphans = [t for t in stored_trials(storage, study) if t.state == TrialState.RUNNING]
    assert orphans, "the killed driver left nothing running"
    with stopping() as procs:
        rerun = simcal_run(
            config, tmp_path, "--workers", WORKERS, "--storage", storage, name="driver-2"
        )
        procs.append(rerun)
        assert rerun.wait(600) == 0, rerun.output()[-4000:]
    # Stale trials may be recovered in several batches (an owned trial goes stale with its
    # driver's lease, one killed mid-ask by its start time): the counts add up to the orphans.
    recovered = re.findall(r"re-enqueued (\d+) trial\(s\) a previous driver left running",
                           rerun.output())
    assert sum(int(n) for n in recovered) == len(orphans), rerun.output()[-3000:]
    trials = stored_trials(storage, study)
    assert_no_loss(trials, max_trials)
    by_number = {t.number: t for t in trials}
    for orphan in orphans:
        assert by_number[orphan.number].user_attrs["fail_reason"] == "interrupted"


def test_sigkill_then_rerun_resumes_without_loss_sqlite(tmp_path: Path) -> None:
    """SIGKILL the driver and its cluster; the re-run on the same SQLite file loses nothing."""
    _kill_then_resume(tmp_path, f"sqlite:///{tmp_path / 'simcal.db'}", "resume-sqlite")


def test_sigkill_then_rerun_resumes_without_loss_postgres(tmp_path: Path, pg_server) -> None:
    """The same against a real PostgreSQL server on 127.0.0.1."""
    database = f"resume_{tmp_path.name.lower()[-20:].replace('-', '_')}"
    pg_server.admin(f"CREATE DATABASE {database} OWNER {pg_server.user}")
    _kill_then_resume(tmp_path, pg_server.url(database=database), "resume-postgres")


def test_ctrl_c_in_a_terminal_stops_now_quietly_and_loses_nothing(tmp_path: Path) -> None:
    """Ctrl-C: SIGINT to the whole foreground process group, as a terminal sends it. The local
    workers ignore it (no worker traceback); the driver tells what finished, re-enqueues the
    trials in flight and exits long before its 300 s grace period, in a few lines."""
    study, hang_rate, fault_seed = "ctrl-c", 0.5, 1  # seed 1: the probe's point does not hang
    options = {
        "duration": 0.3, "hang_rate": hang_rate, "hang_seconds": 600, "fault_seed": fault_seed
    }
    config = write_config(
        tmp_path, study=study, model_options=options, replicates=1, max_trials=40,
        max_in_flight=2, sampler="random", grace_period=300,
    )
    storage, summary = f"sqlite:///{tmp_path / 'simcal.db'}", tmp_path / "summary.json"
    argv = [
        *SIMCAL, "run", "--config", str(config), "--workers", "2", "--metrics-port", "0",
        "--dashboard-address", "127.0.0.1:0", "--summary", str(summary),
    ]
    with stopping() as procs:
        driver = start("driver", argv, tmp_path, cwd=tmp_path)  # its own session and group
        procs.append(driver)

        def told_some_and_two_hung() -> bool:
            if not driver.says(STUDY_OPEN):
                return False
            trials = stored_trials(storage, study)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            hung = [t for t in running if fault_draw(t.params, fault_seed) < hang_rate]
            return len(finished(trials)) >= 1 and len(hung) == 2

        wait_until(told_some_and_two_hung, 300, "a told trial and two hung ones in flight")
        before = stored_trials(storage, study)
        driver.signal(signal.SIGINT, group=True)  # the terminal's Ctrl-C
        # far below grace_period (300 s): it does not wait for the hung trials
        assert driver.wait(120) == 0, driver.output()[-4000:]

    output = driver.output()
    for noise in ("Traceback", "KeyboardInterrupt", "CancelledError", "still alive after"):
        assert noise not in output, output[-4000:]
    after_signal = output.split("SIGINT: stopping now", 1)[1].splitlines()[1:]
    json_start = after_signal.index("{")
    log_lines = after_signal[:json_start]
    assert len(log_lines) <= 8, "\n".join(log_lines)
    # no Dask line at all: a worker that got the SIGINT too shuts down, and the scheduler
    # says it lost the tasks of "Removing worker ..."
    assert not [line for line in log_lines if "distributed." in line], "\n".join(log_lines)
    trials = stored_trials(storage, study)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    by_number = {t.number: t for t in trials}
    for trial in before:  # what had finished stays told; what was in flight is re-enqueued
        if trial.state.is_finished():
            assert by_number[trial.number].state == trial.state
    interrupted = sorted(
        t.number for t in trials if t.user_attrs.get("fail_reason") == "interrupted"
    )
    assert len(interrupted) == 2, interrupted
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["retry_of"] for t in waiting) == interrupted
    this_run = json.loads(summary.read_text(encoding="utf-8"))["this_run"]
    assert this_run["stop_reason"] == "signal" and this_run["interrupted"] == 2


def test_ctrl_c_while_the_cluster_starts_exits_130_without_tracebacks(tmp_path: Path) -> None:
    """Ctrl-C (to the whole group) before the first trial: nothing to tell, exit 128 + 2 at
    once, no traceback of the driver or of a worker, no process left in the group."""
    config = write_config(tmp_path, study="early", max_trials=50, model_options={"duration": 1})
    argv = [
        *SIMCAL, "run", "--config", str(config), "--workers", "2", "--metrics-port", "0",
        "--dashboard-address", "127.0.0.1:0",
    ]
    with stopping() as procs:
        driver = start("driver", argv, tmp_path, cwd=tmp_path)
        procs.append(driver)
        wait_until(lambda: driver.says("starting a local cluster"), 120, "the cluster to start")
        # while the cluster starts a Ctrl-C is ignored (its workers must not get one): repeat
        deadline = time.monotonic() + 120
        while driver.alive() and time.monotonic() < deadline:
            driver.signal(signal.SIGINT, group=True)
            time.sleep(0.5)
        assert driver.wait(10) == 128 + signal.SIGINT, driver.output()[-3000:]
        wait_until(lambda: not _group_alive(driver.pid), 30, "the local workers to exit")
    output = driver.output()
    assert "SIGINT before the first trial: stopped, nothing to tell" in output, output[-3000:]
    for noise in ("Traceback", "KeyboardInterrupt"):
        assert noise not in output, output[-3000:]
    assert stored_trials(f"sqlite:///{tmp_path / 'simcal.db'}", "early") == []


def _group_alive(pgid: int) -> bool:
    import os

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
