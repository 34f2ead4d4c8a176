"""Cluster faults survived, with real ``dask scheduler``/``dask worker`` processes and signals.

Each test starts its own scheduler and workers on 127.0.0.1 (free ports), runs ``simcal run``
against them in a subprocess, injects the fault, and then checks the stored trials.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from distributed import Client
from optuna.trial import TrialState

from conftest import write_config
from processes import (
    STUDY_OPEN,
    Proc,
    assert_no_loss,
    finished,
    simcal_run,
    start_scheduler,
    start_workers,
    stopping,
    stored_trials,
    wait_until,
)
from simcal.models.synthetic import fault_draw

pytestmark = pytest.mark.timeout(900)


def _storage(directory: Path) -> str:
    return f"sqlite:///{directory / 'simcal.db'}"


def _summary(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _progress(driver: Proc, storage: str, study: str, at_least: int) -> bool:
    if not driver.says(STUDY_OPEN):
        return False
    return len(finished(stored_trials(storage, study))) >= at_least


def test_worker_killed_mid_calibration_loses_no_trial(tmp_path: Path) -> None:
    """SIGKILL a worker process running a simulation: Dask reruns its tasks, nothing is lost."""
    # About 25 s of simulation on 3 workers: under load, noticing the first told trial and
    # finding a busy worker can take many seconds; with 0.4 s replicates the run could end
    # first (seen: 'timed out waiting for a worker running a simulation').
    study, max_trials = "worker-kill", 36
    config = write_config(
        tmp_path, study=study, model_options={"duration": 1.0}, replicates=2,
        max_trials=max_trials, sampler="random",
    )
    storage, summary = _storage(tmp_path), tmp_path / "summary.json"
    scheduler, address = start_scheduler(tmp_path)
    with stopping(scheduler) as procs, Client(address, timeout=60) as client:
        procs.append(start_workers(address, tmp_path, nworkers=3))
        client.wait_for_workers(3, timeout=180)
        driver = simcal_run(config, tmp_path, "--scheduler", address, "--summary", str(summary))
        procs.append(driver)
        wait_until(lambda: _progress(driver, storage, study, 2), 180, "2 told trials")

        pids = client.run(os.getpid)

        def busy_worker_pid() -> int | None:
            assert driver.alive(), "the run ended before a worker could be killed mid-run"
            for worker, keys in client.processing().items():
                if any(str(key).startswith("sim-") for key in keys) and worker in pids:
                    return int(pids[worker])
            return None

        victim = int(wait_until(busy_worker_pid, 60, "a worker running a simulation", 0.05))
        os.kill(victim, signal.SIGKILL)
        assert driver.wait(600) == 0, driver.output()[-4000:]

    workers_log = procs[1].output()
    assert f"Worker process {victim} was killed by signal 9" in workers_log
    trials = stored_trials(storage, study)
    assert_no_loss(trials, max_trials)
    assert all(t.state == TrialState.COMPLETE for t in trials), "a killed worker failed a trial"
    this_run = _summary(summary)["this_run"]
    assert this_run["completed"] + this_run["failed"] == max_trials  # each trial told once


def test_memory_hog_is_told_worker_lost_and_calibration_goes_on(tmp_path: Path) -> None:
    """A simulation over the worker memory limit: nanny restarts, KilledWorker, ``worker_lost``."""
    study, max_trials, rate, fault_seed = "memory-hog", 16, 0.25, 7  # trials 6, 11, 12
    options = {
        "duration": 1.5, "memory_mb": 400, "memory_rate": rate, "fault_seed": fault_seed,
    }
    config = write_config(
        tmp_path, study=study, model_options=options, replicates=1, max_trials=max_trials,
        max_in_flight=3, sampler="random", trial_timeout=300,
    )
    storage, summary = _storage(tmp_path), tmp_path / "summary.json"
    env = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    scheduler, address = start_scheduler(tmp_path, env=env)
    with stopping(scheduler) as procs, Client(address, timeout=60) as client:
        workers = start_workers(address, tmp_path, nworkers=3, memory_limit="250MB", env=env)
        procs.append(workers)
        client.wait_for_workers(3, timeout=180)
        driver = simcal_run(config, tmp_path, "--scheduler", address, "--summary", str(summary))
        procs.append(driver)
        assert driver.wait(600) == 0, driver.output()[-4000:]
        client.wait_for_workers(3, timeout=120)  # the nannies brought every worker back

    trials = stored_trials(storage, study)
    assert_no_loss(trials, max_trials)
    heavy = {t.number for t in trials if fault_draw(t.params, fault_seed, stream=1) < rate}
    assert heavy, "no trial drew the memory fault; change fault_seed"
    assert len(heavy) < max_trials / 2
    for trial in trials:
        if trial.number in heavy:
            assert trial.state == TrialState.FAIL, f"memory hog {trial.number} was told complete"
            assert trial.user_attrs["fail_reason"] == "worker_lost", trial.user_attrs
            assert "KilledWorker" in trial.user_attrs["error"]
    light = [t for t in trials if t.number not in heavy]
    completed = [t for t in light if t.state == TrialState.COMPLETE]
    # a task that shared a dying worker may be blamed too (allowed-failures=1), rarely
    assert len(completed) >= len(light) - 2, [t.user_attrs for t in light if t not in completed]
    assert any(t.number > min(heavy) for t in completed), "nothing completed after a hog"
    assert "exceeded 95% memory budget" in workers.output()
    assert _summary(summary)["this_run"]["errors"].get("worker_lost", 0) >= len(heavy)


def test_hung_simulation_times_out_and_its_worker_is_restarted(tmp_path: Path) -> None:
    """A hang: the trial is told ``timeout``, its worker restarted, the calibration completes."""
    study, max_trials, hang_rate, fault_seed = "hang", 14, 0.25, 8  # trials 1, 2, 5, 7
    options = {"duration": 0.3, "hang_rate": hang_rate, "fault_seed": fault_seed}
    config = write_config(
        tmp_path, study=study, model_options=options, replicates=1, max_trials=max_trials,
        max_in_flight=2, sampler="random", trial_timeout=8,
    )
    storage = _storage(tmp_path)
    scheduler, address = start_scheduler(tmp_path)
    with stopping(scheduler) as procs, Client(address, timeout=60) as client:
        workers = start_workers(address, tmp_path, nworkers=2)
        procs.append(workers)
        client.wait_for_workers(2, timeout=180)
        driver = simcal_run(config, tmp_path, "--scheduler", address)
        procs.append(driver)
        assert driver.wait(600) == 0, driver.output()[-4000:]
        client.wait_for_workers(2, timeout=120)
        stuck = {
            worker: keys for worker, keys in client.call_stack().items() if keys
        }  # nothing still hangs: every hung worker was restarted
        assert not stuck, stuck

    trials = stored_trials(storage, study)
    assert_no_loss(trials, max_trials)
    hung = sorted(t.number for t in trials if fault_draw(t.params, fault_seed) < hang_rate)
    assert len(hung) >= 2, f"only {hung} drew the hang fault: every slot must hang once"
    by_number = {t.number: t for t in trials}
    for number in hung:
        assert by_number[number].state == TrialState.FAIL
        assert by_number[number].user_attrs["fail_reason"] == "timeout"
    # two workers, at least two hangs: without the restarts nothing after them could finish
    later = [t for t in trials if t.number > hung[-1] and t.state == TrialState.COMPLETE]
    assert later, "no trial completed after the hangs: the stuck workers were not restarted"
    assert workers.output().count("Restarting worker") >= len(hung) - 1


def test_scheduler_killed_driver_exits_1_and_rerun_resumes(tmp_path: Path) -> None:
    """SIGKILL the scheduler: the driver exits 1 saying so, storage intact; a re-run resumes."""
    study, max_trials = "scheduler-kill", 24
    config = write_config(
        tmp_path, study=study, model_options={"duration": 0.5}, replicates=2,
        max_trials=max_trials, sampler="random",
    )
    storage = _storage(tmp_path)
    scheduler, address = start_scheduler(tmp_path)
    with stopping(scheduler) as procs:
        procs.append(start_workers(address, tmp_path, nworkers=2))
        driver = simcal_run(config, tmp_path, "--scheduler", address)
        procs.append(driver)
        wait_until(lambda: _progress(driver, storage, study, 4), 180, "4 told trials")
        scheduler.signal(signal.SIGKILL)
        killed = time.monotonic()
        status = driver.wait(180)
        noticed = time.monotonic() - killed
    output = driver.output()
    assert status == 1, output[-4000:]
    assert "simcal: error:" in output and "lost" in output and "scheduler" in output, output
    assert "Traceback" not in output.split("simcal: error:")[-1]
    assert noticed < 120, f"the driver took {noticed:.0f}s to notice"

    trials = stored_trials(storage, study)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.user_attrs.get("fail_reason") == "interrupted"]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert interrupted, "nothing was in flight when the scheduler died"
    retried = sorted(t.user_attrs["retry_of"] for t in waiting)
    assert sorted(t.number for t in interrupted) == retried
    done_before = len(finished(trials))
    assert 4 <= done_before < max_trials

    scheduler, address = start_scheduler(tmp_path)
    with stopping(scheduler) as procs:
        procs.append(start_workers(address, tmp_path, nworkers=2, name="workers-2"))
        rerun = simcal_run(config, tmp_path, "--scheduler", address, name="driver-2")
        procs.append(rerun)
        assert rerun.wait(600) == 0, rerun.output()[-4000:]
    assert_no_loss(stored_trials(storage, study), max_trials)
