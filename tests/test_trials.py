"""The stored-trial lifecycle (simcal.trials) on a real SQLite file, without Dask: leases,
claims, a tell that another driver beat, the budget tally; and unsupported storage backends."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from conftest import run_simcal
from simcal.samplers import make_sampler
from simcal.storage import open_study
from simcal.trials import (
    FAIL_REASON,
    HOST,
    INTERRUPTED,
    RETRY_OF,
    RUN_ID,
    DriverLease,
    LeaseObserver,
    Tally,
    Told,
    TrialStore,
    recover_stale,
    requeue,
    stale_trials,
    tally,
    tell,
    tell_many,
)

SPACE = {"x": FloatDistribution(0.0, 1.0)}


@pytest.fixture
def study(tmp_path: Path) -> optuna.Study:
    return open_study(f"sqlite:///{tmp_path / 'trials.db'}", "lifecycle", make_sampler("random", 0))


def _asked(study: optuna.Study, run_id: str) -> optuna.Trial:
    """A trial another driver asked (as TrialStore.ask records its owner)."""
    trial = study.ask(SPACE)
    trial.set_user_attr(RUN_ID, run_id)
    trial.set_user_attr(HOST, "host-" + run_id)
    return trial


def test_a_live_lease_keeps_its_trials_and_a_stale_one_loses_them(study: optuna.Study) -> None:
    """A lease is as old as the time this observer has seen its renewal counter unchanged,
    on the observer's own clock: the wall times the drivers write play no part."""
    now = [0.0]
    observer = LeaseObserver(clock=lambda: now[0])
    live, dead = DriverLease(study, "live", interval=60), DriverLease(study, "dead", interval=60)
    live.renew()
    dead.renew()
    mine, theirs, orphan = _asked(study, "live"), _asked(study, "dead"), _asked(study, "me")
    ownerless = study.ask(SPACE)  # its driver died between ask and recording itself
    assert stale_trials(study, "me", 30, observer) == []  # first seen: fresh
    now[0] = 29.0
    assert stale_trials(study, "me", 30, observer) == []
    now[0] = 31.0
    stale = stale_trials(study, "me", 30, observer)
    assert {t.number for t in stale} == {mine.number, theirs.number, ownerless.number}
    live.renew()  # the live driver renews: only the dead one's trials are stale
    now[0] = 40.0
    assert {t.number for t in stale_trials(study, "me", 30, observer)} == {
        theirs.number, ownerless.number
    }
    now[0] = 69.0  # the live lease's change was seen at 40: 29 s ago
    assert theirs.number in {t.number for t in stale_trials(study, "me", 30, observer)}
    assert stale_trials(study, "me", 30) == []  # a fresh observer has seen nothing age
    assert recover_stale(study, "me", 30, observer=observer) == [theirs.number, ownerless.number]
    assert recover_stale(study, "me", 30, observer=observer) == []  # claimed once only
    trials = {t.number: t for t in study.get_trials()}
    assert trials[theirs.number].user_attrs[FAIL_REASON] == INTERRUPTED
    retry = [t for t in trials.values() if t.user_attrs.get(RETRY_OF) == theirs.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].system_attrs["fixed_params"] == theirs.params
    assert trials[mine.number].state == trials[orphan.number].state == TrialState.RUNNING


def test_a_released_lease_is_stale_at_once(study: optuna.Study) -> None:
    lease = DriverLease(study, "gone", interval=60)
    lease.start()
    trial = _asked(study, "gone")
    lease.release()
    assert [t.number for t in stale_trials(study, "me", grace=3600)] == [trial.number]


def test_tell_after_another_driver_claimed_the_trial_drops_the_result(
    study: optuna.Study,
) -> None:
    trial = _asked(study, "slow")
    other = optuna.load_study(study_name="lifecycle", storage=study._storage._backend.url)
    assert recover_stale(other, "fast", grace=0) == [trial.number]  # judged dead, claimed
    # the slow driver's tell: no UpdateFinishedTrialError, just "someone else told it"
    assert tell(study, trial, 0.25, attrs={"loss_y": 0.25}) is False
    stored = study.get_trials()[trial.number]
    assert stored.state == TrialState.FAIL and stored.user_attrs[FAIL_REASON] == INTERRUPTED
    assert "loss_y" not in stored.user_attrs


def test_tell_writes_attributes_and_state_together(study: optuna.Study) -> None:
    trial = _asked(study, "me")
    assert tell(study, trial, 0.5, attrs={"loss_y": 0.5, "duration_seconds": 1.0}) is True
    stored = study.get_trials()[0]
    assert stored.state == TrialState.COMPLETE and stored.value == 0.5
    assert stored.user_attrs == {
        "run_id": "me",
        "host": "host-me",
        "loss_y": 0.5,
        "duration_seconds": 1.0,
    }
    failed = _asked(study, "me")
    assert tell(study, failed, state=TrialState.FAIL, attrs={FAIL_REASON: "timeout"})
    assert tally(study).counted == 2


def test_tally_counts_the_budget_across_drivers(study: optuna.Study) -> None:
    done, running, claimed = (_asked(study, "a") for _ in range(3))
    tell(study, done, 1.0)
    lease = DriverLease(study, "b", interval=60)
    lease.renew(released=True)
    _asked(study, "b")
    assert tally(study) == tally(study).__class__(counted=1, running=3, waiting=0)
    recover_stale(study, "a", grace=30)  # b's trial: interrupted (not counted), re-enqueued
    counts = tally(study)
    assert (counts.counted, counts.running, counts.waiting) == (1, 2, 1)
    assert counts.committed == 4
    del running, claimed


def test_the_driver_view_reads_others_late_and_its_own_trials_at_once(study: optuna.Study) -> None:
    """Inside TrialStore.view, other drivers' trials are read at most every ``seconds``; the
    driver's own asks and tells are in its view at once (written through, never read back),
    and the database holds each ask's parameters and owner."""
    _asked(study, "a")
    other = optuna.load_study(study_name="lifecycle", storage=study._storage._backend.url)
    store = TrialStore(study, SPACE, run_id="me", host="host-me")
    with store.view(seconds=3600):
        assert len(study.get_trials()) == 1
        _asked(other, "b")  # another driver's trial
        assert len(study.get_trials()) == 1  # not read yet
        mine = store.ask(waiting=False)
        view = {t.number: t for t in study.get_trials()}
        assert view[mine.number].params == mine.params and "x" in mine.params
        assert view[mine.number].user_attrs == {RUN_ID: "me", HOST: "host-me"}
        assert tell(study, mine, 0.5, attrs={"loss_y": 0.5})
        told = {t.number: t for t in study.get_trials()}[mine.number]
        assert (told.state, told.value, told.user_attrs["loss_y"]) == (
            TrialState.COMPLETE,
            0.5,
            0.5,
        )
        assert len(study.get_trials()) == 2  # still not the other driver's
        store.read_fresh()
        assert len(study.get_trials()) == 3
    stored = {t.number: t for t in other.get_trials()}
    assert stored[mine.number].params == mine.params
    assert stored[mine.number].user_attrs[RUN_ID] == "me"
    assert stored[mine.number].state == TrialState.COMPLETE
    assert len(study.get_trials()) == 3  # fresh after the block


def test_the_driver_view_learns_when_another_driver_claimed_its_trial(
    study: optuna.Study,
) -> None:
    other = optuna.load_study(study_name="lifecycle", storage=study._storage._backend.url)
    store = TrialStore(study, SPACE, run_id="me", host="host")
    with store.view(seconds=3600):
        mine = store.ask(waiting=False)
        claimed = other.get_trials()[0]
        assert requeue(other, claimed, SPACE)  # judged dead: failed, re-enqueued
        assert tell(study, mine, 0.5) is False  # dropped, not crashed
        view = {t.number: t for t in study.get_trials()}
        assert view[mine.number].state == TrialState.FAIL
        assert view[mine.number].user_attrs[FAIL_REASON] == INTERRUPTED
        retry = store.ask(waiting=True)  # pops the enqueued retry
        assert retry.params == mine.params and retry.user_attrs[RETRY_OF] == mine.number
        assert tell(study, retry, 0.25)
    assert tally(study) == tally(study).__class__(counted=1, running=0, waiting=0)


@pytest.mark.parametrize("url", ["mysql://u:pw-Zq81@db/simcal", "oracle://scott:tiger@db"])
def test_an_unsupported_storage_backend_exits_2_naming_it(url: str, tmp_path: Path) -> None:
    result = run_simcal("run", "--storage", url, "--max-trials", "1", cwd=tmp_path, timeout=120)
    backend = url.split(":", 1)[0]
    assert result.returncode == 2, result.stderr
    assert f"storage: storage backend {backend!r} is not supported" in result.stderr
    assert "Traceback" not in result.stderr and "pw-Zq81" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing created


def test_lease_grace_must_span_two_renewals() -> None:
    from simcal.config import ConfigError, demo_config

    with pytest.raises(ConfigError, match="lease_grace: must be at least twice lease_interval"):
        demo_config({"lease_interval": 5, "lease_grace": 9})
    assert demo_config({"lease_interval": 1, "lease_grace": 2}).lease_grace == 2


def test_every_optuna_the_package_admits_is_verified() -> None:
    """pyproject.toml bounds optuna to the releases VERIFIED_OPTUNA lists: a plain
    `pip install .` can resolve to no release that takes Optuna's public (slow) paths, and
    admits every verified one."""
    import tomllib

    from packaging.requirements import Requirement

    from simcal.optuna_internals import VERIFIED_OPTUNA

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    (optuna_req,) = [Requirement(d) for d in dependencies if Requirement(d).name == "optuna"]
    releases = sorted(tuple(int(p) for p in v.split(".")) for v in VERIFIED_OPTUNA)
    for major, minor in releases:
        assert optuna_req.specifier.contains(f"{major}.{minor}.0"), (major, minor)
        assert optuna_req.specifier.contains(f"{major}.{minor}.9"), (major, minor)
    newest = releases[-1]
    for unverified in (f"{newest[0]}.{newest[1] + 1}.0", f"{newest[0] + 1}.0.0"):
        assert not optuna_req.specifier.contains(unverified), unverified
    oldest = releases[0]
    if oldest[1] > 0:
        assert not optuna_req.specifier.contains(f"{oldest[0]}.{oldest[1] - 1}.0")
    else:
        assert not optuna_req.specifier.contains(f"{oldest[0] - 1}.99.0")


def test_an_unverified_optuna_takes_the_public_storage_path(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an Optuna release the private storage API was not verified against, tells, tallies
    and pruned tells go through Optuna's public path, with the same results."""
    import simcal.optuna_internals as internals

    assert internals.storage_verified()
    assert not internals.storage_verified("99.0.0")
    assert TrialStore(study, SPACE, run_id="me").fast
    monkeypatch.setattr(optuna, "__version__", "99.0.0")
    assert internals.rdb(study) is None  # the fast RDB paths are off
    store = TrialStore(study, SPACE, run_id="me", host="host")
    assert not store.fast  # chosen once, when built
    with store.view() as view:
        assert view is None  # Optuna's own cached storage
        asked = store.ask(waiting=True)
        assert asked.user_attrs == {RUN_ID: "me", HOST: "host"}
        assert tell(study, asked, 0.5)
    trial = _asked(study, "me")
    assert tell(study, trial, 0.25, attrs={"loss_y": 0.25}) is True
    pruned = _asked(study, "me")
    pruned.report(0.75, 1)
    assert tell(study, pruned, state=TrialState.PRUNED, attrs={"pruned_at_replicates": 1})
    stored = study.get_trials()
    assert [t.state for t in stored] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED]
    assert stored[1].user_attrs["loss_y"] == 0.25 and stored[2].value == 0.75
    assert tally(study).counted == 3


@pytest.mark.parametrize("optuna_version", [None, "99.0.0"], ids=["rdb", "public"])
def test_the_tally_before_a_trial_counts_only_those_created_before_it(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch, optuna_version: str | None
) -> None:
    """What the driver's budget rule reads after an ask (simcal.driver's _over_budget): on
    both storage paths, the trials created before a given one, by the same rules."""
    if optuna_version:
        monkeypatch.setattr(optuna, "__version__", optuna_version)
    store = TrialStore(study, SPACE, run_id="me", host="h")
    with store.view():
        done, running, interrupted, last = (store.ask(waiting=False) for _ in range(4))
        store.tell(done, 0.5)
        store.tell(interrupted, state=TrialState.FAIL, attrs={FAIL_REASON: INTERRUPTED})
        assert store.tally(before=last) == Tally(counted=1, running=1, waiting=0)
        assert store.tally(before=running) == Tally(counted=1, running=0, waiting=0)
        assert store.tally(before=done) == Tally()
        assert store.tally() == Tally(counted=1, running=2, waiting=0)


def test_tell_many_is_one_group_commit_that_skips_a_claimed_trial(study: optuna.Study) -> None:
    """A batch of results is told in one transaction; a trial another driver claimed meanwhile
    is left as it is stored (False), the others are told; a NaN loss is told failed."""
    other = optuna.load_study(study_name="lifecycle", storage=study._storage._backend.url)
    store = TrialStore(study, SPACE, run_id="me", host="h")
    with store.view(seconds=3600):
        first, claimed, third = (store.ask(waiting=False) for _ in range(3))
        stored = {t.number: t for t in other.get_trials()}
        assert requeue(other, stored[claimed.number], SPACE)
        told = tell_many(
            study,
            [
                Told(first, 0.5, attrs={"loss_y": 0.5}),
                Told(claimed, 0.1),
                Told(third, float("nan")),
            ],
        )
        assert told == [True, False, True]
        view = {t.number: t for t in study.get_trials()}
    final = {t.number: t for t in other.get_trials()}
    for trials in (view, final):
        assert trials[first.number].state == TrialState.COMPLETE
        assert trials[first.number].user_attrs["loss_y"] == 0.5
        assert trials[claimed.number].state == TrialState.FAIL
        assert trials[claimed.number].user_attrs[FAIL_REASON] == INTERRUPTED
        assert trials[third.number].state == TrialState.FAIL
    assert tally(study) == tally(study).__class__(counted=2, running=0, waiting=1)


def test_the_trial_store_times_every_operation_and_keeps_its_path(
    study: optuna.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every storage operation of a run goes through TrialStore, which reports its seconds as
    simcal_storage_seconds{operation} (ask, tell, other); its path is chosen once, when it is
    built, so narrowing the verified releases later leaves a built store on the RDB path."""
    timed: list[str] = []
    store = TrialStore(
        study, SPACE, run_id="me", host="h", lease_grace=0,
        timer=lambda operation, seconds: timed.append(operation),
    )
    monkeypatch.setattr(optuna, "__version__", "99.0.0")  # after building: no effect on it
    assert store.fast
    with store.view(seconds=3600) as view:
        assert view is not None  # the driver's RDB view, not Optuna's cache
        first, second, third = (store.ask(waiting=False) for _ in range(3))
        assert store.tell_many([Told(first, 0.5)]) == [True]
        assert store.tell(second, 0.25)
        assert store.requeue(third)
        assert store.tally() == Tally(counted=2, running=0, waiting=1)
        assert store.recover_stale() == []
        store.read_fresh()
        assert store.best_values(1) == [0.25]
        assert store.stored_count() == 4
    assert timed == ["ask"] * 3 + ["tell"] * 3 + ["other"] * 5
