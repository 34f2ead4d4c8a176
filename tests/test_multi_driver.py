"""Several drivers on one study: three real ``simcal run`` processes against one Dask cluster.

Driver A and B start together; A is SIGKILLed mid-run while it holds trials; C starts right
after, while A's lease still looks alive. The accounting must be exact: each counted trial
once, between ``max_trials`` and ``max_trials + drivers - 1`` counted (exactly ``max_trials``
but for a recovery in the same instant as the last asks: a claim and its re-enqueue are two
commits; the race between live drivers alone is test_calibration's), nothing left RUNNING
or WAITING, only the dead driver's trials interrupted (nobody takes over a live driver's
trials), each of them re-run, and within about a minute of the kill.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import write_config
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

MAX_TRIALS = 30
DRIVERS = 3
LEASE_GRACE = 4.0


def _three_drivers(tmp_path: Path, storage: str, study: str) -> None:
    config = write_config(
        tmp_path,
        study=study,
        max_trials=MAX_TRIALS,
        replicates=2,
        model_options={"duration": 0.3},
        sampler="random",
        lease_interval=1.0,
        lease_grace=LEASE_GRACE,
    )
    with stopping() as procs:
        scheduler, address = start_scheduler(tmp_path)
        procs.append(scheduler)
        procs.append(start_workers(address, tmp_path, nworkers=3))

        def driver(name: str):
            proc = simcal_run(
                config, tmp_path, "--scheduler", address, "--storage", storage,
                "--min-workers", "3", "--summary", str(tmp_path / f"{name}.json"), name=name,
            )
            procs.append(proc)
            return proc

        a, b = driver("a"), driver("b")

        def a_holds_trials() -> bool:
            if not (a.says(STUDY_OPEN) and b.says(STUDY_OPEN)):
                return False
            trials = stored_trials(storage, study)
            runs = {t.user_attrs.get("run_id") for t in finished(trials)}
            running = [t for t in trials if t.state == TrialState.RUNNING]
            return len(finished(trials)) >= 4 and len(runs) >= 2 and bool(running)

        wait_until(a_holds_trials, 240, "both drivers telling trials")
        # A's run id: the owner of trials B does not report as its own at the end
        a.signal(signal.SIGKILL, group=True)
        assert a.wait(30) == -signal.SIGKILL
        killed_at = time.time()
        c = driver("c")  # started late, while A's lease still looks alive
        assert b.wait(300) == 0, b.output()[-4000:]
        assert c.wait(300) == 0, c.output()[-4000:]

    summaries = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("b", "c")}
    live = {summaries[n]["this_run"]["run_id"] for n in summaries}
    for name, summary in summaries.items():
        assert summary["this_run"]["dropped_told_by_another_driver"] == 0, (name, summary)
        assert summary["this_run"]["interrupted"] == 0, (name, summary)
    for output in (b.output(), c.output()):
        assert "Traceback" not in output, output[-4000:]

    trials = stored_trials(storage, study)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    open_ = [(t.number, t.state.name) for t in trials if not t.state.is_finished()]
    assert not open_, f"trials left open: {open_}"
    counted = finished(trials)
    assert MAX_TRIALS <= len(counted) <= MAX_TRIALS + DRIVERS - 1, len(counted)
    for trial in counted:
        assert "duration_seconds" in trial.user_attrs, f"trial {trial.number} not told by simcal"
        assert trial.user_attrs.get("run_id") and trial.user_attrs.get("host"), trial.number
    owners = {t.user_attrs.get("run_id") for t in trials} - live - {None}
    assert len(owners) == 1, f"expected exactly the killed driver besides B and C: {owners}"
    (dead,) = owners
    # A surplus trial: a live driver asked over the budget because another popped the waiting
    # retry first; told at once, never run, not counted (simcal.trials.SURPLUS).
    surplus = [t for t in trials if t.user_attrs.get("surplus")]
    assert all(t.user_attrs.get("run_id") in live and not t.user_attrs.get("retry_of")
               for t in surplus), surplus
    interrupted = [t for t in trials if t.user_attrs.get("fail_reason") == "interrupted"
                   and not t.user_attrs.get("surplus")]
    assert interrupted, "the killed driver left nothing to recover"
    for trial in interrupted:  # only the dead driver's (or ownerless) trials were taken over
        assert trial.user_attrs.get("run_id") in (dead, None), trial.user_attrs
        assert trial.datetime_complete.timestamp() - killed_at < 60, "recovered too late"
    retries = {t.user_attrs.get("retry_of"): t for t in trials if "retry_of" in t.user_attrs}
    names = set().union(*(t.params.keys() for t in trials if t.state == TrialState.COMPLETE))
    ran = [t for t in interrupted  # killed mid-ask (some parameters stored): never ran
           if names <= {**(t.system_attrs.get("fixed_params") or {}), **t.params}.keys()]
    for trial in ran:
        retry = retries.get(trial.number)
        assert retry is not None, f"interrupted trial {trial.number} was never retried"
        assert counted_once(retry, trials)
        assert retry.params == {**(trial.system_attrs.get("fixed_params") or {}), **trial.params}
    recovered = sum(s["this_run"]["recovered_from_other_drivers"] for s in summaries.values())
    assert recovered == len(interrupted)
    delays = [t.datetime_complete.timestamp() - killed_at for t in interrupted]
    by_driver = {
        run: sum(1 for t in counted if t.user_attrs.get("run_id") == run) for run in (*live, dead)
    }
    print(  # the accounting, for the record (pytest -s)
        f"\n{study}: {len(counted)} counted (max_trials {MAX_TRIALS}, bound "
        f"{MAX_TRIALS + DRIVERS - 1}), {len(trials)} stored; counted by driver "
        f"{sorted(by_driver.values(), reverse=True)} (killed driver {by_driver[dead]}); "
        f"{len(interrupted)} interrupted, all the killed driver's, {len(ran)} re-run once; "
        f"{len(surplus)} surplus; recovered {min(delays):.1f}-{max(delays):.1f} s after the "
        f"kill (lease_grace {LEASE_GRACE:.0f} s); nothing left open"
    )


def counted_once(retry: object, trials: list) -> bool:
    """A retry is told like any trial, and no other trial retries the same one."""
    same = [t for t in trials if t.user_attrs.get("retry_of") == retry.user_attrs["retry_of"]]
    return len(same) == 1 and retry.state in (TrialState.COMPLETE, TrialState.FAIL)


def test_three_drivers_one_killed_one_late_sqlite(tmp_path: Path) -> None:
    _three_drivers(tmp_path, f"sqlite:///{tmp_path / 'simcal.db'}", "three-sqlite")


def test_three_drivers_one_killed_one_late_postgres(tmp_path: Path, pg_server: object) -> None:
    database = f"multi_{tmp_path.name.lower()[-20:].replace('-', '_')}"
    pg_server.admin(f"CREATE DATABASE {database} OWNER {pg_server.user}")
    _three_drivers(tmp_path, pg_server.url(database=database), "three-postgres")


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
