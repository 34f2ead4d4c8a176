"""Resume: a driver killed with SIGKILL mid-run, then re-run, loses no trial."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

from conftest import SIMCAL, run_simcal, write_config
from processes import assert_no_loss
from simcal.trials import (
    FAIL_REASON,
    INTERRUPTED,
    RETRY_OF,
    counted_trials,
    recover_stale,
    requeue,
)

MAX_TRIALS = 40


def wait_for_counted(storage: str, study: str, at_least: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if counted_trials(optuna.load_study(study_name=study, storage=storage)) >= at_least:
                return
        except KeyError:
            pass  # the study does not exist yet
        time.sleep(0.5)
    raise AssertionError(f"fewer than {at_least} trials told within {timeout}s")


def kill_and_resume(config: Path, storage: str, study: str) -> optuna.Study:
    """Start a run, SIGKILL it (driver and its local cluster) mid-run, then run it again."""
    args = [
        "run",
        "--config",
        str(config),
        "--workers",
        "4",
        "--metrics-port",
        "0",
        "--dashboard-address",
        ":0",
        "--storage",
        storage,
    ]
    driver = subprocess.Popen(
        [*SIMCAL, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_counted(storage, study, at_least=8)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    killed = optuna.load_study(study_name=study, storage=storage)
    assert counted_trials(killed) < MAX_TRIALS, "the run finished before it was killed"
    resumed = run_simcal(*args, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    return optuna.load_study(study_name=study, storage=storage)


def assert_nothing_lost(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0, states
    assert counted_trials(study) == MAX_TRIALS
    assert_no_loss(trials, MAX_TRIALS)


def test_sigkilled_driver_resumes_without_loss_on_sqlite(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        study="resume",
        max_trials=MAX_TRIALS,
        lease_interval=1.0,  # the re-run recovers the killed run's trials once its lease
        lease_grace=4.0,  # is stale (lease_grace), no longer at once
        replicates=2,
        model_options={"duration": 0.3},
    )
    storage = f"sqlite:///{tmp_path / 'simcal.db'}"
    study = kill_and_resume(config, storage, "resume")
    assert_nothing_lost(study)
    assert any(t.user_attrs.get(FAIL_REASON) == INTERRUPTED for t in study.get_trials()), (
        "the kill should have left trials in flight to recover"
    )


def test_recovery_retries_what_ran_and_nothing_killed_mid_ask(tmp_path: Path) -> None:
    """Every state a SIGKILL can leave a trial in, recovered then run to the budget, loses nothing.

    Deterministic stand-in for the kill-and-resume tests, whose kill lands wherever it lands:
    a trial killed mid-ask (no or some parameters stored) never ran; a popped retry killed
    before its parameters were stored still owes its original's run.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    space["y"] = optuna.distributions.FloatDistribution(0, 1)
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 's.db'}", sampler=optuna.samplers.RandomSampler(seed=1)
    )

    def done(trial: optuna.Trial) -> None:
        trial.set_user_attr("duration_seconds", 0.1)
        study.tell(trial, 1.0)

    done(study.ask(space))
    study.ask()  # 1: killed before any parameter was stored
    study.ask().suggest_float("x", 0, 1)  # 2: killed with only some stored
    running = study.ask(space)  # 3: killed while its replicates ran
    earlier = study.ask(space)  # 4: interrupted by an earlier driver, its retry popped ...
    requeue(study, earlier, space)
    popped = study.ask()  # 5: ... and killed before the retry's parameters were stored
    assert popped.params == {} and popped.user_attrs[RETRY_OF] == earlier.number

    assert recover_stale(study, "the-next-driver", 0.0, space) == [1, 2, 3, 5]
    while counted_trials(study) < 6:  # the re-run
        done(study.ask(space))
    trials = study.get_trials(deepcopy=False)
    assert_no_loss(trials, 6)
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    assert retried == {running.number, earlier.number, popped.number}
